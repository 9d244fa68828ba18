"""Alternated step timing of compared runs: every run's step is rebuilt from its directory and
timed in lock-step with the others, with wall and CPU time, ratios to each backprop run."""

from __future__ import annotations

import time
from pathlib import Path

from forwardgrad.bench.timing import alternate
from forwardgrad.experiments import TrainConfig, train
from forwardgrad.experiments.step_timing import is_loaded, is_noisy, time_runs


def test_alternate_records_cpu_time_beside_wall_time():
    cpu: dict[str, list[float]] = {}

    def busy() -> None:  # 2 ms of this thread's CPU time, however long that takes on a busy machine
        end = time.thread_time() + 0.002
        while time.thread_time() < end:
            pass

    wall = alternate({"busy": busy, "sleep": lambda: time.sleep(0.002)}, 4, warmup=1, cpu=cpu)
    assert len(cpu["busy"]) == len(wall["busy"]) == 4
    assert all(0.002 <= c <= w + 1e-4 for c, w in zip(cpu["busy"], wall["busy"]))
    assert max(cpu["sleep"]) < 0.001 <= min(wall["sleep"])  # sleeping takes no CPU time


def test_time_runs_gives_ratios_to_every_backprop_run(tmp_path):
    dirs = []
    for name, estimator in (("fwd", "forward"), ("bp", "backprop"), ("bp2", "backprop")):
        config = TrainConfig(problem="rosenbrock", estimator=estimator, lr=1e-4, steps=3, threads=1)
        dirs.append(train(config, tmp_path / name).run_dir)
    timing = time_runs(dirs, rounds=5, warmup=1, budget_s=None)
    assert timing["rounds"] == 5 and timing["threads"] == 1
    assert set(timing["runs"]) == {"fwd", "bp", "bp2"}
    forward = timing["runs"]["fwd"]
    assert forward["label"].startswith("forward")
    assert set(forward["ratio_to"]) == {"bp", "bp2"}
    assert timing["runs"]["bp"]["ratio_to"]["bp"]["median"] == 1.0
    ratio = forward["ratio_to"]["bp"]
    assert ratio["p10"] <= ratio["median"] <= ratio["p90"] and ratio["cpu"] > 0
    assert 0 < timing["cpu_share"] <= 1.5


def test_loaded_and_noisy_flags():
    assert is_loaded({"cpu_share": 0.5}) and not is_loaded({"cpu_share": 0.97})
    assert is_noisy({"median": 2.0, "p10": 1.0, "p90": 3.5})
    assert not is_noisy({"median": 2.0, "p10": 1.9, "p90": 2.2})


def test_step_peak_bytes_measures_one_step_in_a_fresh_process(tmp_path, monkeypatch):
    from forwardgrad.experiments.step_memory import probe_step, step_peak_bytes

    config = TrainConfig(problem="rosenbrock", estimator="forward", lr=1e-4, steps=2, threads=1)
    run_dir = train(config, tmp_path / "run").run_dir
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    peak = step_peak_bytes(run_dir)
    assert peak is not None and 0 <= peak < 2**20  # a 2-parameter step: below the noise floor
    assert probe_step(str(run_dir))["above_bytes"] >= 0
    assert step_peak_bytes(tmp_path / "missing") is None  # a failed probe gives no figure
