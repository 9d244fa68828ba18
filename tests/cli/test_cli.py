"""The ``forwardgrad`` command line, end to end at tiny sizes, and every bad input it refuses.

Most tests call ``main(argv)`` in this process (fast); two start a real process, for
``python -m forwardgrad`` and for SIGTERM.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import final_params, install_tiny_dataset, read_metrics

from forwardgrad.cli import main
from forwardgrad.cli.progress import ProgressDisplay
from forwardgrad.experiments import Progress, paper
from forwardgrad.experiments.checkpoints import list_checkpoints

REPO = Path(__file__).resolve().parents[2]
TRAIN_SIZE, TEST_SIZE = 96, 40
TINY = ["--dataset", "tiny", "--batch-size", "16", "--threads", "1", "--quiet"]


@pytest.fixture
def tiny_data(tmp_path, monkeypatch) -> Path:
    """FORWARDGRAD_DATA_DIR with a learnable 96+40-example data set registered as "tiny"."""
    return install_tiny_dataset(monkeypatch, tmp_path / "data", TRAIN_SIZE, TEST_SIZE)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("command", [[], ["train"], ["compare"], ["reproduce"], ["plot"]])
def test_help_everywhere(command, capsys):
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: forwardgrad")
    if command in (["train"], ["compare"]):
        for flag in ("--problem", "--dataset", "--data-dir", "--tangents", "--distribution",
                     "--combine", "--optimizer", "--lr", "--lr-decay", "--batch-size", "--steps",
                     "--epochs", "--seed", "--out"):  # fmt: skip
            assert flag in out


def test_train_writes_a_run_directory_with_report(tiny_data, tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["train", "--problem", "logreg", *TINY, "--estimator", "backprop", "--lr", "0.05"]
    code, out, err = run([*argv, "--steps", "10", "--eval-every", "5", "--out", out_dir], capsys)
    assert code == 0, err
    assert "test accuracy" in out and "report.md" in out
    assert {"config.json", "metrics.csv", "summary.json", "report.md"} <= {
        p.name for p in out_dir.iterdir()
    }
    assert list(out_dir.glob("*.png"))
    config = json.loads((out_dir / "config.json").read_text())
    assert config["command"][:2] == ["forwardgrad", "train"]
    assert config["lr"] == 0.05 and config["dataset"] == "tiny" and config["steps"] == 10
    assert [r["step"] for r in read_metrics(out_dir) if r["test_accuracy"]] == ["0", "5", "10"]


def test_progress_lines_when_not_a_terminal_and_a_bar_otherwise():
    def events(label: str):
        yield Progress(0, 40, 0, None, 0.1, 0.0, label=label)
        for step in range(1, 41):
            yield Progress(step, 40, 0, 1.0 / step, 0.1, 0.01 * step, 2.0, 0.5, label)

    lines = io.StringIO()
    display = ProgressDisplay(lines, mode="auto")  # a StringIO is not a terminal
    for event in events("backprop"):
        display(event)
    text = lines.getvalue().splitlines()
    assert text[0] == "backprop: from step 0 to 40"
    assert len(text) == 11 and text[-1].startswith("backprop: step 40/40, loss 0.025")
    assert "steps/s" in text[-1] and "ETA" in text[-1] and "test acc 0.500" in text[-1]

    bar = io.StringIO()
    display = ProgressDisplay(bar, mode="bar")
    for event in events("forward"):
        display(event)
    display.close()
    assert "forward" in bar.getvalue() and "40/40" in bar.getvalue()
    assert "loss 0.025" in bar.getvalue()


def test_compare_uses_the_same_seed_and_data_order(tiny_data, tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    command = [
        "compare", "--problem", "mlp", *TINY, "--steps", "4", "--eval-every", "0",
        "--estimators", "forward,backprop,zeroth-order", "--out", out_dir,
    ]  # fmt: skip
    code, out, err = run(
        command,
        capsys,
    )
    assert code == 0, err
    runs = sorted(p.name for p in out_dir.iterdir() if p.is_dir())
    assert runs == ["backprop", "forward-k-1-normal-mean", "zeroth-order-k-1-normal-eps-0.001"]
    assert (out_dir / "report.md").is_file()
    # Same seed: same initial model and same first batch, so forward and backprop compute the
    # very same step-0 loss (zeroth-order reports the mean of its perturbed losses).
    first = {name: read_metrics(out_dir / name)[0]["train_loss"] for name in runs}
    assert first["forward-k-1-normal-mean"] == first["backprop"]
    assert float(first["zeroth-order-k-1-normal-eps-0.001"]) == pytest.approx(
        float(first["backprop"]), rel=1e-3
    )
    # Rerunning the same command keeps the finished runs instead of failing or redoing them.
    before = (out_dir / "backprop" / "summary.json").stat().st_mtime_ns
    code, _, err = run(
        command,
        capsys,
    )
    assert code == 0, err
    assert (out_dir / "backprop" / "summary.json").stat().st_mtime_ns == before


def test_compare_with_lr_sweep_records_the_choice(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    code, _, err = run(
        ["compare", "--problem", "beale", "--estimators", "backprop,forward", "--steps", "40",
         "--lr-sweep", "0.001,0.01", "--sweep-steps", "20", "--quiet", "--out", out_dir],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    for name in ("backprop-own-lr", "forward-k-1-normal-mean-own-lr"):
        sweep = json.loads((out_dir / name / "lr_sweep.json").read_text())
        summary = json.loads((out_dir / name / "summary.json").read_text())
        assert summary["lr_selected_by"] == "sweep"
        assert summary["lr"] == sweep["best_lr"] == 0.01
        assert set(sweep["scores"]) == {"0.001", "0.01"}


def test_reproduce_runs_every_planned_experiment(tiny_data, tmp_path, capsys, monkeypatch):
    tiny = {"steps": 6, "eval_every": 3, "log_every": 1, "sweep_steps": 3}
    monkeypatch.setattr(
        paper,
        "EXPERIMENTS",
        (
            paper.Experiment("beale", {**tiny, "lr": 0.01}, {}, (1e-3, 1e-2)),
            paper.Experiment("logreg", tiny, {}, (1e-2, 1e-1)),
        ),
    )
    out_dir = tmp_path / "repro"
    code, out, err = run(
        ["reproduce", "--dataset", "tiny", "--estimators", "backprop", "--threads", "1",
         "--quiet", "--out", out_dir],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    for problem in ("beale", "logreg"):
        names = sorted(p.name for p in (out_dir / problem).iterdir() if p.is_dir())
        assert names == ["backprop", "backprop-own-lr"]
        assert (out_dir / problem / "report.md").is_file()
    report = (out_dir / "report.md").read_text()
    assert "beale" in report and "logreg" in report
    assert "own lr" in report or "own learning rate" in report


def test_plot_redraws_from_the_logs(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(["train", "--problem", "beale", "--steps", "10", "--quiet", "--out", run_dir],
               capsys)[0] == 0  # fmt: skip
    for png in run_dir.glob("*.png"):
        png.unlink()
    (run_dir / "report.md").unlink()
    code, out, err = run(["plot", run_dir], capsys)
    assert code == 0, err
    assert (run_dir / "report.md").is_file() and list(run_dir.glob("*.png"))


# --------------------------------------------------------------------------- interrupts, resume


def test_sigint_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--problem", "rosenbrock", "--lr", "1e-3", "--threads", "1", "--quiet"]

    def interrupt_once_training() -> None:  # like Ctrl-C a few steps in
        deadline = time.monotonic() + 60
        while len(_lines(run_dir / "metrics.csv")) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_once_training, daemon=True)
    interrupter.start()
    code, _, err = run([*argv, "--steps", "10000000", "--out", run_dir], capsys)
    interrupter.join()
    assert code == 130
    assert err.count("\n") == 1 and f"forwardgrad train --resume {run_dir}" in err
    step = list_checkpoints(run_dir / "checkpoints")[0][0]
    assert step > 0

    steps = str(step + 25)
    assert run(["train", "--resume", run_dir, "--steps", steps, "--quiet"], capsys)[0] == 0
    assert run([*argv, "--steps", steps, "--out", tmp_path / "straight"], capsys)[0] == 0
    straight, resumed = final_params(tmp_path / "straight"), final_params(run_dir)
    assert torch.equal(straight["x"], resumed["x"])
    rows = [read_metrics(d) for d in (tmp_path / "straight", run_dir)]
    assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]]


def test_sigterm_in_a_real_process_exits_143_with_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forwardgrad",
            "train",
            "--problem",
            "rosenbrock",
            "--steps",
            "10000000",
            "--checkpoint-every",
            "0",
            "--out",
            str(run_dir),
        ],  # fmt: skip
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_lines(run_dir / "metrics.csv")) < 3:
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, err
    assert "Traceback" not in err
    assert "interrupted after step" in err and "--resume" in err
    assert "from step 0 to 10000000" in err  # not a terminal: plain progress lines
    assert len(list_checkpoints(run_dir / "checkpoints")) == 1


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


def test_divergence_exits_1_with_one_message_and_keeps_the_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(
        ["train", "--problem", "rosenbrock", "--estimator", "backprop", "--lr", "0.1",
         "--lr-decay", "0", "--steps", "200", "--checkpoint-every", "1", "--quiet",
         "--out", run_dir],
        capsys,
    )  # fmt: skip
    assert code == 1
    assert err.count("\n") == 1 and "diverged" in err and "lower the learning rate" in err
    assert json.loads((run_dir / "summary.json").read_text())["diverged"] is True
    assert list_checkpoints(run_dir / "checkpoints")


# --------------------------------------------------------------------------- bad input


BAD_INPUTS = {
    "no command": [],
    "unknown command": ["frobnicate"],
    "unknown problem": ["train", "--problem", "resnet"],
    "unknown dataset": ["train", "--dataset", "cifar"],
    "unknown estimator": ["train", "--estimator", "magic"],
    "unknown in list": ["compare", "--estimators", "forward,magic"],
    "unknown optimizer": ["train", "--optimizer", "lbfgs"],
    "negative lr": ["train", "--problem", "beale", "--lr", "-1"],
    "nan lr": ["train", "--problem", "beale", "--lr", "nan"],
    "batch 0": ["train", "--batch-size", "0"],
    "tangents 0": ["train", "--problem", "beale", "--tangents", "0"],
    "steps 0": ["train", "--problem", "beale", "--steps", "0"],
    "steps not a number": ["train", "--steps", "many"],
    "steps and epochs": ["train", "--steps", "5", "--epochs", "1"],
    "epochs of a test function": ["train", "--problem", "beale", "--epochs", "1"],
    "beale in 3-D": ["train", "--problem", "beale", "--dim", "3"],
    "orthogonal zeroth-order": [
        "train",
        "--problem",
        "beale",
        "--estimator",
        "zeroth-order",
        "--distribution",
        "orthogonal",
    ],  # fmt: skip
    "bad sweep list": ["train", "--problem", "beale", "--lr-sweep", "0.1,-2"],
    "corrupt data": ["train", "--dataset", "tiny", "--steps", "2", "{corrupt}"],
    "resume missing dir": ["train", "--resume", "{tmp}/nowhere"],
    "resume with settings": ["train", "--lr", "0.1", "--resume", "{done}"],
    "plot missing dir": ["plot", "{tmp}/nowhere"],
    "out already used": ["train", "--problem", "beale", "--out", "{done}"],
}


# What the message must mention, where argparse's own wording does not already make it plain.
EXPECTED_WORDS = {
    "negative lr": "lr must be",
    "batch 0": "batch_size",
    "tangents 0": "tangents",
    "corrupt data": "truncated or corrupt",
    "resume missing dir": "no config.json",
    "resume with settings": "drop --lr",
    "out already used": "already holds files",
    "orthogonal zeroth-order": "distribution",
}


@pytest.mark.parametrize("argv", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_and_exit_2(argv, tiny_data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    if "{corrupt}" in argv:  # truncate one IDX file
        images = tiny_data / "tiny" / "train-images-idx3-ubyte"
        images.write_bytes(images.read_bytes()[:-10])
    if "{done}" in argv:  # a finished run to misuse
        argv_done = ["train", "--problem", "beale", "--steps", "3", "--quiet"]
        assert main([*argv_done, "--out", str(tmp_path / "done")]) == 0
        capsys.readouterr()
    places = {"{empty}": tmp_path / "empty", "{tmp}": tmp_path, "{done}": tmp_path / "done"}
    resolved = []
    for arg in argv:
        if arg != "{corrupt}":
            for key, value in places.items():
                arg = arg.replace(key, str(value))
            resolved.append(arg)
    if resolved[:1] == ["train"]:
        resolved.append("--quiet")

    code, out, err = run(resolved, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("forwardgrad") and "error:" in lines[0]
    assert "Traceback" not in err and out == ""
    for key, words in EXPECTED_WORDS.items():
        if BAD_INPUTS[key] == argv:
            assert words in lines[0]
