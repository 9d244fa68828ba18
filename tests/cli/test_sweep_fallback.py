"""A swept learning rate that diverges in the full run is replaced by the next candidate, and
the sweep's record is kept in every case."""

from __future__ import annotations

import json

import pytest

from forwardgrad.cli import main
from forwardgrad.cli import runs as cli_runs
from forwardgrad.experiments import TrainingDiverged

SWEEP = ["--lr-sweep", "0.001,0.01", "--sweep-steps", "20", "--quiet"]


def _diverging_at(monkeypatch, diverging: set[float]) -> None:
    """Full (swept) runs at a learning rate in ``diverging`` train, then report a divergence."""
    real_train = cli_runs.train

    def train(config, run_dir, *args, **kwargs):
        result = real_train(config, run_dir, *args, **kwargs)
        if config.lr_selected_by == "sweep" and config.lr in diverging:
            raise TrainingDiverged("training diverged", step=7, loss=float("inf"), checkpoint=None)
        return result

    monkeypatch.setattr(cli_runs, "train", train)


def test_a_rate_diverging_in_the_full_run_is_replaced_by_the_next_candidate(
    tmp_path, monkeypatch, capsys
):
    _diverging_at(monkeypatch, {0.01})
    out = tmp_path / "cmp"
    argv = ["compare", "--problem", "beale", "--estimators", "backprop", "--steps", "60"]
    assert main([*argv, *SWEEP, "--out", str(out)]) == 0, capsys.readouterr().err
    run_dir = out / "backprop-own-lr"
    record = json.loads((run_dir / "lr_sweep.json").read_text())
    assert record["best_lr"] == 0.01 and record["used_lr"] == 0.001
    assert record["diverged_in_full_run"] == [{"lr": 0.01, "step": 7}]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["lr"] == 0.001 and not summary["diverged"]


def test_the_sweep_record_is_kept_when_every_candidate_diverges(tmp_path, monkeypatch, capsys):
    _diverging_at(monkeypatch, {0.01, 0.001})
    out = tmp_path / "cmp"
    argv = ["compare", "--problem", "beale", "--estimators", "backprop", "--steps", "60"]
    main([*argv, *SWEEP, "--out", str(out)])
    assert "warning" in capsys.readouterr().err
    record = json.loads((out / "backprop-own-lr" / "lr_sweep.json").read_text())
    assert [d["lr"] for d in record["diverged_in_full_run"]] == [0.01, 0.001]


@pytest.fixture(autouse=True)
def _beale_sweep_picks_the_larger_rate():
    """Beale at 0.01 beats 0.001 after 20 steps (checked here, so the tests above mean it)."""
    from forwardgrad.experiments import TrainConfig, sweep_learning_rate

    config = TrainConfig(problem="beale", estimator="backprop", steps=60, threads=1)
    assert sweep_learning_rate(config, (0.001, 0.01), steps=20).best_lr == 0.01
