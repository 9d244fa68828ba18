"""Frank-Wolfe in the training loop and on the command line: feasibility of the saved model, the
gap columns, exact resume, averaged vs raw comparisons, the reproduce experiment, bad input."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import FRANK_WOLFE, final_params, image_config, install_tiny_dataset, read_metrics
from torch import nn

from forwardgrad.cli import main
from forwardgrad.experiments import paper, train
from forwardgrad.experiments.checkpoints import list_checkpoints, read_checkpoint
from forwardgrad.experiments.optimizers import constraint_for, exact_frank_wolfe_gap
from forwardgrad.experiments.problems import make_model
from forwardgrad.optim.frank_wolfe import FrankWolfe

TRAIN_SIZE, TEST_SIZE = 64, 32
TINY = ["--dataset", "tiny", "--batch-size", "16", "--threads", "1", "--quiet"]
FW = ["--optimizer", "frank-wolfe"]


@pytest.fixture
def tiny_data(tmp_path, monkeypatch) -> Path:
    """FORWARDGRAD_DATA_DIR with a learnable 64+32-example data set registered as "tiny"."""
    return install_tiny_dataset(monkeypatch, tmp_path / "data", TRAIN_SIZE, TEST_SIZE)


def run(argv: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- the loop


CONSTRAINTS = ["l1:2", "l2:1", "linf:0.01", "simplex:1", "nuclear:3", "k-sparse:5:0.05"]


@pytest.mark.parametrize("constraint", CONSTRAINTS)
def test_every_saved_parameter_stays_in_its_set(constraint, tiny_data, tmp_path):
    config = image_config(
        tiny_data, **FRANK_WOLFE, constraint=constraint, steps=6, eval_every=3, checkpoint_every=3
    )
    train(config, tmp_path / "run")
    params = final_params(tmp_path / "run")
    initial = make_model("logreg").state_dict()
    weight = initial["linear.weight"]  # PyTorch's init lies outside every one of these sets
    assert not constraint_for(weight, constraint).contains(weight)
    for name, value in params.items():
        assert constraint_for(value, constraint).contains(value), name
    if constraint == "nuclear:3":  # the bias, a vector, is held in the L2 ball of radius 3
        assert float(params["linear.bias"].norm()) <= 3 * (1 + 1e-4)
        assert torch.linalg.matrix_norm(params["linear.weight"], "nuc") <= 3 * (1 + 1e-4)


def test_metrics_log_the_step_size_and_finite_gaps(tiny_data, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run(
        ["train", "--problem", "logreg", *TINY, *FW, "--constraint", "l1:5", "--steps", "8",
         "--eval-every", "4", "--log-every", "1", "--test-examples", "20", "--out", out_dir],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    rows = read_metrics(out_dir)
    assert list(rows[0])[-2:] == ["fw_gap", "fw_gap_exact"]
    assert [int(r["step"]) for r in rows] == list(range(9))
    for row in rows:  # γ_t = 2/(t+2), which also gives the final row's next step
        assert float(row["lr"]) == pytest.approx(2 / (int(row["step"]) + 2), rel=1e-12)
    gaps = [float(r["fw_gap"]) for r in rows[:-1]]  # the final row takes no step
    assert rows[-1]["fw_gap"] == "" and all(math.isfinite(g) and g >= -1e-6 for g in gaps)
    exact = {int(r["step"]): float(r["fw_gap_exact"]) for r in rows if r["fw_gap_exact"]}
    assert set(exact) == {0, 4, 8} and all(math.isfinite(g) and g >= -1e-6 for g in exact.values())
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["constraint"], config["fw_averaging"]) == ("l1:5", True)
    assert (config["lr"], config["lr_decay"]) == ("2/(t+2)", 0.0)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["label"] == "forward (K=1, normal, mean), Frank-Wolfe averaged"
    assert summary["final_fw_gap_exact"] == exact[8]
    report = (out_dir / "report.md").read_text()
    assert "constraint l1:5" in report and "test examples 20" in report
    assert "| 2/(t+2) |" in report and (out_dir / "fw_gap.png").is_file()


def test_a_constant_step_size_from_lr(tiny_data, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, _, err = run(
        ["train", "--problem", "logreg", *TINY, *FW, "--constraint", "linf:0.1", "--lr", "0.25",
         "--no-averaging", "--steps", "3", "--eval-every", "0", "--out", out_dir],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert {float(r["lr"]) for r in read_metrics(out_dir)} == {0.25}
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["lr"], config["fw_averaging"]) == (0.25, False)


def test_resume_ends_exactly_like_an_uninterrupted_run(tiny_data, tmp_path, capsys):
    argv = ["train", "--problem", "logreg", *TINY, *FW, "--constraint", "l1:5",
            "--eval-every", "3", "--log-every", "1", "--checkpoint-every", "0"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run([*argv, "--steps", "8", "--out", straight], capsys)[0] == 0
    assert run([*argv, "--steps", "4", "--out", resumed], capsys)[0] == 0
    # The checkpoint of step 4 holds the optimizer's running averages and step counts.
    optimizer_state = read_checkpoint(list_checkpoints(resumed / "checkpoints")[0][1])["optimizer"]
    assert all(s["step"] == 4 and "average" in s for s in optimizer_state["state"].values())
    code, _, err = run(["train", "--resume", resumed, "--steps", "8", "--quiet"], capsys)
    assert code == 0, err
    a, b = final_params(straight), final_params(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)

    def columns(rows):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]

    assert columns(read_metrics(straight)) == columns(read_metrics(resumed))


def test_compare_averaged_and_raw(tiny_data, tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    code, out, err = run(
        ["compare", "--problem", "logreg", *TINY, *FW, "--constraint", "l1:5", "--steps", "4",
         "--eval-every", "2", "--log-every", "1", "--estimators", "forward,backprop",
         "--averaging", "both", "--out", out_dir],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    names = sorted(p.name for p in out_dir.iterdir() if p.is_dir())
    assert names == [
        "backprop-frank-wolfe-averaged",
        "backprop-frank-wolfe-raw",
        "forward-k-1-normal-mean-frank-wolfe-averaged",
        "forward-k-1-normal-mean-frank-wolfe-raw",
    ]
    for name in names:
        config = json.loads((out_dir / name / "config.json").read_text())
        assert config["fw_averaging"] == name.endswith("averaged")
    # Same seed and data: at step 0 the raw and averaged directions agree (d_0 = g_0).
    first = {name: read_metrics(out_dir / name)[0] for name in names}
    assert first[names[2]]["fw_gap"] == first[names[3]]["fw_gap"]
    assert first[names[0]]["fw_gap_exact"] == first[names[2]]["fw_gap_exact"]
    assert (
        read_metrics(out_dir / names[2])[1]["fw_gap"]
        != read_metrics(out_dir / names[3])[1]["fw_gap"]
    )
    report = (out_dir / "report.md").read_text()
    assert "## logreg, Frank-Wolfe in l1:5" in report and "Rostami & Kia" in report
    assert "exact gap: last" in report
    assert (out_dir / "logreg-frank-wolfe-in-l1-5_fw_gap.png").is_file()


def test_reproduce_runs_the_constrained_experiment(tiny_data, tmp_path, capsys, monkeypatch):
    (experiment,) = [e for e in paper.EXPERIMENTS if e.name == "logreg-frank-wolfe"]
    tiny = {**experiment.quick, "steps": 4, "eval_every": 2, "log_every": 1, "tangents": 2}
    monkeypatch.setattr(paper, "EXPERIMENTS", (replace(experiment, quick=tiny),))
    out_dir = tmp_path / "repro"
    code, _, err = run(
        ["reproduce", "--dataset", "tiny", "--threads", "1", "--quiet", "--out", out_dir], capsys
    )
    assert code == 0, err
    names = sorted(p.name for p in (out_dir / "logreg-frank-wolfe").iterdir() if p.is_dir())
    assert names == [
        "backprop-frank-wolfe-averaged",
        "forward-k-2-normal-mean-frank-wolfe-averaged",
        "forward-k-2-normal-mean-frank-wolfe-raw",
    ]
    report = (out_dir / "report.md").read_text()
    assert "Frank-Wolfe gap with the exact gradient" in report
    assert list(out_dir.glob("*_fw_gap.png"))


def test_exact_gap_of_a_linear_function_over_the_l1_ball():
    # f(x) = <c, x>: gap = <c, x> - min_{|s|_1 <= R} <c, s> = <c, x> + R max|c_i|.
    x = nn.Parameter(torch.tensor([0.5, -0.25, 0.0]))
    c = torch.tensor([1.0, -3.0, 2.0])
    optimizer = FrankWolfe([x], constraint="l1:2")
    gap = exact_frank_wolfe_gap(optimizer, lambda: torch.dot(c, x))
    assert gap == pytest.approx(float(c @ x.detach()) + 2 * 3.0, rel=1e-6)
    assert x.grad is None  # the gap leaves .grad alone


# --------------------------------------------------------------------------- bad input


BAD_INPUTS = {
    "unknown constraint": ([*FW, "--constraint", "l3:5"], "unknown constraint"),
    "zero radius": ([*FW, "--constraint", "l1:0"], "positive"),
    "negative radius": ([*FW, "--constraint", "simplex:-1"], "positive"),
    "malformed k-sparse": ([*FW, "--constraint", "k-sparse:3"], "k-sparse:K:RADIUS"),
    "k above the parameter": ([*FW, "--constraint", "k-sparse:20:1"], "'linear.bias'"),
    "nuclear on a conv kernel": (
        ["--problem", "cnn", *FW, "--constraint", "nuclear:5"],
        "needs matrix (2-D) parameters, but 'conv1.weight'",
    ),
    "no constraint": (FW, "needs a constraint"),
    "constraint without frank-wolfe": (["--constraint", "l1:5"], "only applies"),
    "no-averaging without frank-wolfe": (["--no-averaging"], "only applies"),
    "step size above 1": ([*FW, "--constraint", "l1:5", "--lr", "2"], "(0, 1]"),
    "lr decay": ([*FW, "--constraint", "l1:5", "--lr-decay", "1e-4"], "lr_decay must be 0"),
    "lr sweep": ([*FW, "--constraint", "l1:5", "--lr-sweep"], "--lr-sweep does not apply"),
}


@pytest.mark.parametrize("argv, words", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
@pytest.mark.parametrize("command", ["train", "compare"])
def test_bad_input_is_one_line_and_exit_2(command, argv, words, tmp_path, capsys):
    base = [command, "--problem", "logreg", "--data-dir", tmp_path, "--no-download", "--quiet"]
    code, out, err = run([*base, *argv, "--out", tmp_path / "out"], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("forwardgrad: error:"), err
    assert words in lines[0] and out == ""
    assert not (tmp_path / "out").exists()


def test_averaging_both_needs_frank_wolfe(tmp_path, capsys):
    code, _, err = run(["compare", "--problem", "beale", "--averaging", "both", "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "frank-wolfe" in err
