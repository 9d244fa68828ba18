"""Tests for forwardgrad.reporting: plots and report.md, from fake run directories made here."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from forwardgrad.reporting import (
    find_run_dirs,
    loss_threshold,
    plot_runs,
    plots,
    read_run,
    smoothed_train_loss,
    time_to_threshold,
    write_comparison_report,
    write_run_report,
)
from forwardgrad.reporting.tables import Section
from forwardgrad.reporting.thresholds import SMOOTHING_ROWS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE_COLUMNS = ["step", "time_s", "train_loss", "lr", "test_loss", "test_accuracy"]
TEST_FUNCTION_COLUMNS = ["distance_to_optimum", "x0", "x1"]


def make_run(
    run_dir: Path,
    *,
    problem: str = "mlp",
    estimator: str = "forward",
    tangents: int = 1,
    losses=None,
    lr: float = 2e-4,
    lr_selected_by: str = "fixed",
    step_time: float = 0.01,
    median_step_time: float | None = None,
    peak_memory: float | None = 100 * 2**20,
    accuracies: dict[int, float] | None = None,
    trajectory: np.ndarray | None = None,
    diverged: bool = False,
    columns: list[str] | None = None,
    write_summary: bool = True,
) -> Path:
    """A run directory in the documented format: config.json, metrics.csv, summary.json."""
    losses = np.exp(-0.02 * np.arange(50)) if losses is None else np.asarray(losses, dtype=float)
    test_function = problem in ("beale", "rosenbrock")
    label = {
        "forward": f"forward (K={tangents}, normal, mean)",
        "zeroth-order": f"zeroth-order (K={tangents}, eps=0.001)",
        "backprop": "backprop",
    }[estimator]
    config = {
        "problem": problem,
        "dataset": None if test_function else "mnist",
        "dim": 2 if test_function else None,
        "estimator": estimator,
        "tangents": tangents,
        "distribution": "normal",
        "combine": "mean",
        "eps": 1e-3,
        "optimizer": "sgd",
        "lr": lr,
        "lr_decay": 1e-4,
        "batch_size": 64,
        "steps": len(losses) - 1,
        "epochs": None,
        "seed": 0,
        "threads": 2,
        "eval_every": 10,
        "log_every": 1,
        "checkpoint_every": 100,
        "world_size": 1,
        "versions": {"forwardgrad": "0.1.0", "torch": "2.13.0", "numpy": "2", "python": "3.11"},
        "machine": {"platform": "Linux-test", "processor": "x86_64", "cpu_count": 2},
        "command": ["forwardgrad", "train", "--problem", problem, "--estimator", estimator],
    }
    if columns is None:
        columns = BASE_COLUMNS + (TEST_FUNCTION_COLUMNS if test_function else [])
    accuracies = accuracies or {}
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for step, loss in enumerate(losses):
            row = {
                "step": step,
                "time_s": step * step_time,
                "train_loss": repr(float(loss)),
                "lr": lr,
                "test_loss": "",
                "test_accuracy": accuracies.get(step, ""),
            }
            if trajectory is not None:
                x0, x1 = trajectory[step]
                row.update(x0=x0, x1=x1, distance_to_optimum=math.hypot(x0 - 3, x1 - 0.5))
            writer.writerow([row.get(name, "") for name in columns])
    (run_dir / "config.json").write_text(json.dumps(config))
    if write_summary:
        summary = {
            "problem": problem,
            "estimator": estimator,
            "label": label,
            "steps": len(losses) - 1,
            "final_train_loss": float(losses[-1]),
            "final_test_loss": None,
            "final_test_accuracy": accuracies[max(accuracies)] if accuracies else None,
            "median_step_time_s": step_time if median_step_time is None else median_step_time,
            "peak_memory_bytes": peak_memory,
            "peak_memory_method": "rss",
            "lr": lr,
            "lr_selected_by": lr_selected_by,
            "world_size": 1,
            "diverged": diverged,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def assert_valid_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def table_rows(report: str, first_header: str = "estimator") -> list[dict[str, str]]:
    """Every row of every markdown table in the report whose first column is `first_header`."""
    rows, header = [], None
    for line in report.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == first_header:
            header = cells
        elif header is not None and not set(line) <= set("|-"):
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def row_for(rows: list[dict[str, str]], label_start: str) -> dict[str, str]:
    matches = [row for row in rows if row["estimator"].startswith(label_start)]
    assert len(matches) == 1, f"expected one row for {label_start!r}, found {matches}"
    return matches[0]


# ----------------------------------------------------------------------------------------------


def test_run_report_writes_pngs_and_table(tmp_path):
    losses = 2.3 * np.exp(-0.03 * np.arange(40))
    run_dir = make_run(
        tmp_path / "run", losses=losses, step_time=0.004, accuracies={20: 0.5, 39: 0.8}
    )
    report_path = write_run_report(run_dir)
    assert report_path == run_dir / "report.md"
    for name in ("loss_vs_steps", "loss_vs_time", "test_accuracy"):
        assert_valid_png(run_dir / f"{name}.png")
        assert f"({name}.png)" in report_path.read_text()
    assert not (run_dir / "trajectories.png").exists()  # not a test function
    report = report_path.read_text()
    (row,) = table_rows(report)
    assert row["estimator"] == "forward (K=1, normal, mean)"
    assert row["median time / iteration"] == "4 ms"
    assert "time ÷ backprop" not in row  # no ratio without a backprop run beside it
    assert row["final train loss"] == f"{losses[-SMOOTHING_ROWS:].mean():.4g}"  # smoothed
    assert row["test accuracy"] == "0.800"
    assert row["peak memory"] == "100.0 MiB"
    assert "Peak memory: rss; n/a: below 1 MiB" in report
    assert "Wall-clock time counts training only" in report
    assert "forwardgrad train --problem mlp --estimator forward" in report


def test_comparison_ratio_to_backprop_and_paper_claims(tmp_path):
    runs = [
        make_run(
            tmp_path / "fwd", estimator="forward", median_step_time=0.006, accuracies={49: 0.9}
        ),
        make_run(
            tmp_path / "bp", estimator="backprop", median_step_time=0.010, accuracies={49: 0.85}
        ),
        make_run(tmp_path / "zo", estimator="zeroth-order", median_step_time=0.004),
    ]
    report = write_comparison_report(tmp_path / "out", runs).read_text()
    rows = table_rows(report)
    assert row_for(rows, "forward")["time ÷ backprop"] == "0.60"
    assert row_for(rows, "backprop")["time ÷ backprop"] == "1.00"
    assert row_for(rows, "zeroth-order")["time ÷ backprop"] == "0.40"
    assert row_for(rows, "forward")["median time / iteration"] == "6 ms"
    claims = {row["quantity"]: row for row in table_rows(report, first_header="quantity")}
    assert claims["time per iteration, forward ÷ backprop"]["this comparison"] == "0.60"
    assert "R_f = 2.46 vs R_b = 4.17" in report
    accuracy = claims["test accuracy, forward vs backprop at the same lr"]
    assert "0.909 vs 0.884" in accuracy["paper or other source"]
    assert accuracy["this comparison"].startswith("0.900 vs 0.850")
    assert claims["peak memory, forward ÷ backprop"]["this comparison"] == "1.00"
    assert "measured on this machine (Linux-test, x86_64, 2 CPUs" in report
    assert "evaluation, logging and checkpointing are excluded" in report
    for name in ("loss_vs_steps", "loss_vs_time", "test_accuracy"):
        assert_valid_png(tmp_path / "out" / f"mlp_{name}.png")


def test_no_backprop_run_gives_no_ratio(tmp_path):
    runs = [make_run(tmp_path / "a"), make_run(tmp_path / "b", estimator="zeroth-order")]
    report = write_comparison_report(tmp_path / "out", runs).read_text()
    assert {row["time ÷ backprop"] for row in table_rows(report)} == {"n/a"}
    assert "No backprop run" in report


def test_threshold_rule_is_stated_and_applied(tmp_path):
    steps = np.arange(200)
    slow, fast = 10 * 0.99**steps, 10 * 0.95**steps
    runs = [
        make_run(tmp_path / "fwd", problem="beale", losses=slow, step_time=0.002),
        make_run(tmp_path / "bp", problem="beale", estimator="backprop", losses=fast),
        # Barely moves: must not set the (then trivial) threshold, and does not reach it.
        make_run(
            tmp_path / "zo", problem="beale", estimator="zeroth-order", losses=10 - 1e-3 * steps
        ),
    ]
    threshold = slow[-1]  # the highest final loss among the runs that improved by >= 10 %
    assert loss_threshold([read_run(path) for path in runs]) == pytest.approx(threshold)
    fast_step = int(np.flatnonzero(fast <= threshold)[0])
    assert time_to_threshold(read_run(runs[1]), threshold) == (fast_step, fast_step * 0.01)

    report = write_comparison_report(tmp_path / "out", runs).read_text()
    rule = "Loss threshold, per section: the highest final value of the train loss, among the runs"
    assert rule in report
    assert f"Loss threshold: {threshold:.4g}." in report
    rows = table_rows(report)
    assert row_for(rows, "forward")["steps"] == "199"
    assert row_for(rows, "forward")["steps to threshold"] == "199"
    assert row_for(rows, "forward")["time to threshold"] == f"{199 * 0.002:.3g} s"
    assert row_for(rows, "backprop")["steps to threshold"] == str(fast_step)
    assert row_for(rows, "zeroth-order")["steps to threshold"] == "not reached"
    claims = {row["quantity"]: row for row in table_rows(report, first_header="quantity")}
    ratio = (fast_step * 0.01) / (199 * 0.002)
    wall_clock = claims["wall-clock time to the threshold, backprop ÷ forward"]
    assert wall_clock["this comparison"] == f"{ratio:.2f}"


def test_smoothing_is_a_trailing_mean_for_minibatch_losses(tmp_path):
    losses = np.arange(1.0, 31.0)
    run = read_run(make_run(tmp_path / "run", losses=losses))
    smoothed = smoothed_train_loss(run)
    window = SMOOTHING_ROWS
    assert smoothed[0] == 1.0
    assert smoothed[3] == pytest.approx(np.mean(losses[:4]))
    assert smoothed[-1] == pytest.approx(np.mean(losses[-window:]))
    # A lucky batch alone does not reach a threshold the trailing mean has not reached.
    noisy = np.full(40, 2.0)
    noisy[5] = 0.1
    run = read_run(make_run(tmp_path / "noisy", losses=noisy))
    assert time_to_threshold(run, 1.0) is None


def test_diverged_run_is_shown_not_fatal(tmp_path):
    losses = np.exp(-0.05 * np.arange(60))
    diverging = losses.copy()
    diverging[30:] = np.nan
    diverging[29] = np.inf
    runs = [
        make_run(tmp_path / "fwd", losses=diverging, diverged=True, accuracies={10: 0.3}),
        make_run(tmp_path / "bp", estimator="backprop", losses=losses, accuracies={59: 0.7}),
    ]
    report = write_comparison_report(tmp_path / "out", runs).read_text()
    row = row_for(table_rows(report), "forward")
    assert "diverged" in row["estimator"]
    assert row["final train loss"] == "diverged after step 28"
    assert row["steps to threshold"] == "not reached"
    # The threshold comes from the run that did not diverge (its final smoothed loss).
    expected = np.mean(losses[-SMOOTHING_ROWS:])
    assert f"Loss threshold: {expected:.4g}." in report
    for name in ("loss_vs_steps", "loss_vs_time", "test_accuracy"):
        assert_valid_png(tmp_path / "out" / f"mlp_{name}.png")
    # The diverged run's own report too, and its flag comes from the NaN rows alone.
    (tmp_path / "fwd" / "summary.json").unlink()
    assert "diverged" in write_run_report(tmp_path / "fwd").read_text()


def test_missing_columns_zero_times_no_summary(tmp_path):
    run_dir = make_run(
        tmp_path / "bare",
        columns=["step", "time_s", "train_loss", "lr"],
        step_time=0.0,
        write_summary=False,
    )
    report = write_run_report(run_dir).read_text()
    (row,) = table_rows(report)
    assert row["median time / iteration"] == "0 ms"
    assert row["test accuracy"] == "—"
    assert row["peak memory"] == "—"
    assert_valid_png(run_dir / "loss_vs_time.png")
    assert not (run_dir / "test_accuracy.png").exists()
    # Zero times cannot give a ratio.
    other = make_run(tmp_path / "bp", estimator="backprop", step_time=0.0)
    rows = table_rows(write_comparison_report(tmp_path / "out", [run_dir, other]).read_text())
    assert row_for(rows, "forward")["time ÷ backprop"] == "n/a"


def test_several_problems_runs_of_different_lengths_and_beale_contour(tmp_path):
    out = tmp_path / "reproduce"
    path = np.linspace([-1.0, 1.5], [2.9, 0.45], 30)
    runs = [
        make_run(out / "beale" / "forward", problem="beale", losses=np.geomspace(10, 0.1, 30),
                 trajectory=path),
        make_run(out / "beale" / "backprop", problem="beale", estimator="backprop",
                 losses=np.geomspace(10, 0.01, 20), trajectory=path[::-1][:20]),
        make_run(out / "mlp" / "forward", losses=np.geomspace(2.3, 1.0, 80)),
        make_run(out / "mlp" / "backprop", estimator="backprop", losses=np.geomspace(2.3, 0.5, 35)),
    ]  # fmt: skip
    assert find_run_dirs(out) == sorted(runs)
    report = write_comparison_report(out, runs, title="Reproduction").read_text()
    assert report.startswith("# Reproduction")
    assert "## beale" in report and "## mlp" in report
    assert report.index("## beale") < report.index("## mlp")
    for name in (
        "beale_loss_vs_steps",
        "beale_loss_vs_time",
        "beale_trajectories",
        "mlp_loss_vs_time",
    ):
        assert_valid_png(out / f"{name}.png")
        assert f"({name}.png)" in report
    assert not (out / "mlp_trajectories.png").exists()
    rows = table_rows(report)
    assert len(rows) == 4
    assert "final distance to optimum" in rows[0]
    assert (
        row_for(rows[:2], "forward")["final distance to optimum"]
        == f"{math.hypot(-0.1, -0.05):.4g}"
    )


def test_beale_trajectory_is_drawn_over_a_contour(tmp_path):
    path = np.linspace([-1.0, 1.5], [2.9, 0.45], 30)
    losses = np.geomspace(10, 0.1, 30)
    run = read_run(make_run(tmp_path / "run", problem="beale", losses=losses, trajectory=path))
    function = plots.test_function_of(run)
    assert function is not None, (
        "forwardgrad.experiments.problems.make_test_function('beale', 2) failed"
    )
    # The grid holds the function itself: Beale is 0 at its minimum (3, 0.5), 14.203125 at 0.
    values = plots.evaluate_on_grid(function.fn, np.array([0.0, 3.0]), np.array([0.0, 0.5]))
    assert values[0, 0] == pytest.approx(14.203125)
    assert values[1, 1] == pytest.approx(0.0, abs=1e-12)
    figure, (ax,) = plots.new_figure(1)
    section = Section("t", "h", [run], show_lr=False, threshold=None)
    plots.plot_trajectories(ax, section, {run.label: "red"}, function)
    assert ax.collections, "no contour was drawn"
    write_run_report(run.path)
    assert_valid_png(run.path / "trajectories.png")


def test_same_lr_and_own_lr_sections(tmp_path):
    runs = [
        make_run(tmp_path / "f1", median_step_time=0.006),
        make_run(tmp_path / "b1", estimator="backprop", median_step_time=0.010),
        make_run(tmp_path / "f2", lr=1e-3, lr_selected_by="sweep", median_step_time=0.006),
        make_run(tmp_path / "b2", estimator="backprop", lr=0.1, lr_selected_by="sweep",
                 median_step_time=0.003),
    ]  # fmt: skip
    report = write_comparison_report(tmp_path / "out", runs).read_text()
    same = report.index("### Paper setting: the same learning rate for every estimator")
    own = report.index("### Each estimator at its own learning rate")
    rows = table_rows(report)
    assert [row["lr chosen by"] for row in rows] == ["fixed", "fixed", "sweep", "sweep"]
    # Each section's ratio uses the backprop run measured in that section.
    assert rows[0]["time ÷ backprop"] == "0.60" and rows[2]["time ÷ backprop"] == "2.00"
    assert rows[2]["lr"] == "0.001" and rows[3]["lr"] == "0.1"
    assert same < own
    assert "2-4×" in report[own:]  # the course report's claim sits beside the tuned comparison
    assert_valid_png(tmp_path / "out" / "mlp_loss_vs_steps.png")


def test_plot_runs_redraws_a_comparison_directory(tmp_path):
    out = tmp_path / "compare"
    make_run(out / "forward")
    make_run(out / "backprop", estimator="backprop")
    written = plot_runs([out])
    assert written == [out / "report.md"]  # the runs' own reports are not rewritten
    assert not (out / "forward" / "report.md").exists()
    assert_valid_png(out / "mlp_loss_vs_steps.png")
    # A single run directory gets only its own report.
    assert plot_runs([out / "forward"]) == [out / "forward" / "report.md"]


def test_bad_run_directories_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory: it has no metrics.csv"):
        read_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no run directory"):
        find_run_dirs(tmp_path)
    run_dir = make_run(tmp_path / "run")
    with open(run_dir / "metrics.csv", "a") as file:
        file.write("50,0.5,oops,0.0002,,\n")
    with pytest.raises(ValueError, match=r"metrics.csv:52: column 'train_loss' holds 'oops'"):
        read_run(run_dir)
    with pytest.raises(ValueError, match="at least one run directory"):
        write_comparison_report(tmp_path / "out", [])


def test_distributed_runs_show_bytes_all_reduced_per_step(tmp_path):
    runs = []
    for estimator, sent in (("forward", 16), ("backprop", 7_454_768)):
        run_dir = make_run(tmp_path / estimator, estimator=estimator)
        for name in ("config.json", "summary.json"):
            data = json.loads((run_dir / name).read_text())
            data["world_size"] = 2
            data["bytes_communicated_per_step"] = sent
            (run_dir / name).write_text(json.dumps(data))
        runs.append(run_dir)
    text = write_comparison_report(tmp_path, runs).read_text()
    assert "bytes all-reduced / step" in text
    assert "| 16 |" in text and "| 7,454,768 |" in text
    assert "world size 2" in text


def test_single_process_runs_have_no_bytes_column(tmp_path):
    runs = [make_run(tmp_path / e, estimator=e) for e in ("forward", "backprop")]
    assert "bytes all-reduced" not in write_comparison_report(tmp_path, runs).read_text()


def write_step_timing(directory: Path, cpu_share: float, ratios: dict[str, tuple]) -> None:
    """A comparison's step_timing.json: run name -> (wall median, p10, p90, cpu ratio)."""
    runs = {
        name: {
            "label": name,
            "wall_s": {"median": 0.01 * m, "p10": 0.01 * lo, "p90": 0.01 * hi},
            "cpu_s": {"median": 0.01 * c, "p10": 0.01 * c, "p90": 0.01 * c},
            "ratio_to": {"bp": {"median": m, "p10": lo, "p90": hi, "cpu": c}},
        }
        for name, (m, lo, hi, c) in ratios.items()
    }
    timing = {"method": "alternated", "threads": 1, "rounds": 40, "cpu_share": cpu_share}
    (directory / "step_timing.json").write_text(json.dumps({**timing, "runs": runs}))


@pytest.mark.parametrize("cpu_share", [0.3, 0.98])
def test_time_ratio_comes_from_the_alternated_steps_and_a_loaded_machine_is_flagged(
    tmp_path, cpu_share
):
    # The runs' own medians (0.2 s against 0.01 s) say 20; the alternated steps say 1.9.
    runs = [
        make_run(tmp_path / "fwd", median_step_time=0.2, losses=np.linspace(2, 1, 50)),
        make_run(tmp_path / "bp", estimator="backprop", losses=np.linspace(2, 0.5, 50)),
    ]
    write_step_timing(tmp_path, cpu_share, {"fwd": (1.9, 1.5, 2.6, 1.95), "bp": (1, 1, 1, 1)})
    report = write_comparison_report(tmp_path / "out", runs).read_text()
    rows = table_rows(report)
    assert row_for(rows, "forward")["time ÷ backprop"] == "1.90 (1.50–2.60) noisy"
    assert row_for(rows, "forward")["median time / iteration"] == "200 ms"  # kept, per run
    # Time to threshold: steps to it × the alternated step time (49 × 19 ms), not the run's own.
    assert row_for(rows, "forward")["time to threshold"] == f"{49 * 0.019:.3g} s"
    claims = {row["quantity"]: row for row in table_rows(report, first_header="quantity")}
    assert claims["time per iteration, forward ÷ backprop"]["this comparison"] == "1.90 (1.50–2.60)"
    assert "CPU-time ratios to backprop" in report and "fwd 1.95" not in report
    assert ("**The machine was loaded**" in report) == (cpu_share < 0.8)
    assert ("Machine not loaded" in report) == (cpu_share >= 0.8)


def test_without_alternated_timing_the_report_says_the_ratio_is_of_separate_runs(tmp_path):
    runs = [make_run(tmp_path / "fwd"), make_run(tmp_path / "bp", estimator="backprop")]
    report = write_comparison_report(tmp_path / "out", runs).read_text()
    assert "taken at different moments" in report


def test_memory_from_the_step_probe_and_n_a_below_the_noise_floor(tmp_path):
    runs = [
        make_run(tmp_path / "fwd", peak_memory=300 * 2**20),
        make_run(tmp_path / "bp", estimator="backprop", peak_memory=20_000),
    ]
    write_step_timing(tmp_path, 1.0, {"fwd": (2, 2, 2, 2), "bp": (1, 1, 1, 1)})
    # The runs' own figures (300 MiB against 20 KB) would give a ratio of noise: n/a instead.
    report = write_comparison_report(tmp_path / "out", runs).read_text()
    rows = table_rows(report)
    assert row_for(rows, "backprop")["peak memory"] == "n/a"
    claims = {row["quantity"]: row for row in table_rows(report, first_header="quantity")}
    assert claims["peak memory, forward ÷ backprop"]["this comparison"].startswith("n/a")
    # The step probe's figures, where they exist, replace the runs' own.
    timing = json.loads((tmp_path / "step_timing.json").read_text())
    timing["runs"]["fwd"]["step_peak_bytes"] = 9 * 2**20
    timing["runs"]["bp"]["step_peak_bytes"] = 8 * 2**20
    (tmp_path / "step_timing.json").write_text(json.dumps(timing))
    report = write_comparison_report(tmp_path / "out", runs).read_text()
    rows = table_rows(report)
    assert [row_for(rows, k)["peak memory"] for k in ("forward", "backprop")] == [
        "9.0 MiB",
        "8.0 MiB",
    ]
    claims = {row["quantity"]: row for row in table_rows(report, first_header="quantity")}
    assert claims["peak memory, forward ÷ backprop"]["this comparison"] == "1.12"
    assert "in a fresh process" in report


def test_plot_keeps_the_order_of_the_original_report(tmp_path):
    out = tmp_path / "compare"
    runs = [make_run(out / "zz-forward"), make_run(out / "aa-backprop", estimator="backprop")]
    first = write_comparison_report(out, runs).read_text()
    labels = [row["estimator"] for row in table_rows(first)]
    assert labels[0].startswith("forward")
    (redrawn,) = plot_runs([out])
    assert [row["estimator"] for row in table_rows(redrawn.read_text())] == labels


def test_accuracy_plot_shows_chance_on_an_axis_from_0_to_1(tmp_path):
    run_dir = make_run(tmp_path / "run", accuracies={0: 0.132, 50: 0.134, 100: 0.136})
    run = read_run(run_dir)
    figure, (ax,) = plots.new_figure(1)
    plots._plot_accuracy(ax, Section("t", "h", [run], show_lr=False, threshold=None), {
        run.label: "red"})  # fmt: skip
    chance = [line for line in ax.get_lines() if line.get_label() == "chance"]
    assert len(chance) == 1 and chance[0].get_ydata()[0] == pytest.approx(0.1)
    assert ax.get_ylim() == (0, 1)
