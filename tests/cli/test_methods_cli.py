"""The command line of structured tangents, activity perturbation, local losses and local
guesses: flags reach config.json, summary.json and report.md; bad values exit 2 in one line;
resume keeps the settings; compare and reproduce put specs side by side."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import final_params, install_tiny_dataset

from forwardgrad.cli import main
from forwardgrad.cli.commands import build_parser
from forwardgrad.cli.compare import _reproduce_plan
from forwardgrad.experiments import paper

TINY = ["--dataset", "tiny", "--batch-size", "16", "--threads", "1", "--quiet"]
MLP = ["--problem", "mlp", *TINY, "--lr", "1e-4", "--eval-every", "2"]


@pytest.fixture
def tiny_data(tmp_path, monkeypatch) -> Path:
    return install_tiny_dataset(monkeypatch, tmp_path / "data", 64, 32)


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("flags", "settings", "label"),
    [
        (["--tangent-rank", "1"], (1, False, None), "forward (K=1, normal, mean, rank 1)"),
        (["--estimator", "activity"], (None, False, None), "activity (K=1, normal)"),
        (["--local-losses"], (None, True, None), "forward (K=1, normal, mean), local losses"),
        (["--local-losses", "--guess", "local"], (None, True, "local"), "forward (local guess)"),
        (["--estimator", "backprop", "--local-losses"], (None, True, None), "backprop, local"),
    ],
)
def test_train_flags_reach_config_summary_and_report(
    tiny_data, tmp_path, capsys, flags, settings, label
):
    out_dir = tmp_path / "run"
    code, out, err = run(["train", *MLP, *flags, "--steps", "4", "--out", out_dir], capsys)
    assert code == 0, err
    config = json.loads((out_dir / "config.json").read_text())
    summary = json.loads((out_dir / "summary.json").read_text())
    for values in (config, summary):
        assert (values["tangent_rank"], values["local_losses"], values["guess"]) == settings
    assert summary["label"].startswith(label) and summary["final_train_loss"] > 0
    assert label in (out_dir / "report.md").read_text().splitlines()[0]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["train", "--tangent-rank", "0"], "--tangent-rank"),
        (["train", "--tangent-rank", "-1"], "--tangent-rank"),
        (["train", "--tangent-rank", "1.5"], "--tangent-rank"),
        (["train", "--tangent-rank", "2", "--estimator", "backprop"], "--tangent-rank"),
        (["train", "--tangent-rank", "2", "--estimator", "zeroth-order"], "--tangent-rank"),
        (["train", "--tangent-rank", "1", "--distribution", "orthogonal"], "--tangent-rank"),
        (["train", "--guess", "local"], "--local-losses"),
        (["train", "--guess", "global", "--local-losses"], "--guess"),
        (["train", "--local-losses", "--problem", "logreg"], "--local-losses"),
        (["train", "--local-losses", "--problem", "beale"], "--local-losses"),
        (["train", "--estimator", "activity", "--problem", "rosenbrock"], "activity"),
        (["train", "--local-losses", "--estimator", "zeroth-order"], "--local-losses"),
        (["compare", "--estimators", "forward:rank=0"], "--estimators"),
        (["compare", "--estimators", "forward:depth=2"], "--estimators"),
        (["compare", "--estimators", "backprop:rank=1"], "--tangent-rank"),
        (["compare", "--estimators", "backprop", "--tangent-rank", "1"], "--tangent-rank"),
        (["compare", "--estimators", "forward,forward:rank=1", "--tangent-rank", "1"], "same run"),
        (["reproduce", "--guess", "local"], "--local-losses"),
        (["reproduce", "--tangent-rank", "0"], "--tangent-rank"),
        (["bench", "--tangent-rank", "0"], "--tangent-rank"),
    ],
)
def test_bad_values_exit_2_with_one_line(tiny_data, tmp_path, capsys, argv, says):
    extra = []
    if argv[0] in ("train", "compare"):
        extra = [*TINY, "--steps", "2"] + ([] if "--problem" in argv else ["--problem", "mlp"])
    code, out, err = run([*argv, *extra, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and says in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_resume_keeps_the_new_settings(tiny_data, tmp_path, capsys):
    flags = [*MLP, "--estimator", "activity", "--local-losses", "--checkpoint-every", "2"]
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    assert run(["train", *flags, "--steps", "2", "--out", run_dir], capsys)[0] == 0
    code, _, err = run(["train", "--resume", run_dir, "--steps", "4", "--quiet"], capsys)
    assert code == 0, err
    assert run(["train", *flags, "--steps", "4", "--out", straight], capsys)[0] == 0
    resumed, whole = final_params(run_dir), final_params(straight)
    assert resumed.keys() == whole.keys() and any("heads" in name for name in whole)
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["local_losses"] and summary["estimator"] == "activity"
    code, _, err = run(["train", "--resume", run_dir, "--tangent-rank", "1"], capsys)
    assert code == 2 and "--tangent-rank" in err


def test_compare_puts_each_spec_in_its_own_run_and_row(tiny_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    specs = "forward,forward:rank=1,activity,forward:local=on,guess=local,backprop"
    code, _, err = run(
        ["compare", *MLP, "--steps", "3", "--estimators", specs, "--out", out], capsys
    )
    assert code == 0, err
    runs = {
        "forward-k-1-normal-mean": (None, False, None),
        "forward-k-1-normal-mean-rank-1": (1, False, None),
        "activity-k-1-normal": (None, False, None),
        "forward-local-guess-local-losses": (None, True, "local"),
        "backprop": (None, False, None),
    }
    assert {p.name for p in out.iterdir() if p.is_dir()} == set(runs)
    report = (out / "report.md").read_text()
    for name, settings in runs.items():
        config = json.loads((out / name / "config.json").read_text())
        assert (config["tangent_rank"], config["local_losses"], config["guess"]) == settings
        label = json.loads((out / name / "summary.json").read_text())["label"]
        assert label in report


def test_shared_flags_apply_to_the_runs_that_take_them(tiny_data, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", *MLP, "--steps", "2", "--local-losses", "--tangent-rank", "1"]
    code, _, err = run(
        [*argv, "--estimators", "forward,zeroth-order,backprop", "--out", out], capsys
    )
    assert code == 0, err
    names = {p.name for p in out.iterdir() if p.is_dir()}
    assert names == {
        "forward-k-1-normal-mean-rank-1-local-losses",
        "zeroth-order-k-1-normal-eps-0.001",  # takes neither: runs as usual, and says so
        "backprop-local-losses",
    }


def test_reproduce_plans_specs_where_they_can_run(tmp_path):
    args = build_parser().parse_args(
        ["reproduce", "--estimators", "forward,forward:rank=1,activity,backprop", "--no-sweep",
         "--problems", "beale,logreg,mlp", "--local-losses"]
    )  # fmt: skip
    plan = _reproduce_plan(args, tmp_path)
    by_problem: dict[str, list[str]] = {}
    for planned in plan:
        by_problem.setdefault(planned.config.problem, []).append(planned.run_dir.name)
    assert "activity-k-1-normal" not in by_problem["beale"]  # no layers to perturb
    assert "forward-k-1-normal-mean-rank-1" in by_problem["logreg"]  # no blocks: no local losses
    assert "activity-k-1-normal-local-losses" in by_problem["mlp"]
    assert "backprop-local-losses" in by_problem["mlp"] and "backprop" in by_problem["logreg"]


def test_reproduce_runs_rank_1_beside_dense_forward_at_the_paper_lr(tmp_path):
    def plan(*argv):
        args = build_parser().parse_args(["reproduce", "--problems", "beale,logreg,mlp", *argv])
        found: dict[str, list] = {}
        for planned in _reproduce_plan(args, tmp_path):
            found.setdefault(planned.config.problem, []).append(planned)
        return found

    default = plan()
    assert not any(p.config.tangent_rank for p in default["beale"])
    for problem in ("logreg", "mlp"):
        dense, rank_1 = [
            next(p for p in default[problem] if p.run_dir.name == name)
            for name in ("forward-k-1-normal-mean", "forward-k-1-normal-mean-rank-1")
        ]
        assert rank_1.candidates is None  # at the paper's lr only, no sweep
        assert rank_1.config.lr == dense.config.lr and rank_1.config.seed == dense.config.seed
        assert rank_1.config == replace(dense.config, tangent_rank=1)
    assert not any(p.config.tangent_rank for p in plan("--estimators", "backprop")["mlp"])
    ranked = [p.run_dir.name for p in plan("--tangent-rank", "1", "--no-sweep")["mlp"]]
    assert ranked.count("forward-k-1-normal-mean-rank-1") == 1


def test_the_reproduction_report_sets_rank_1_beside_dense(tiny_data, tmp_path, capsys, monkeypatch):
    tiny = {"steps": 4, "eval_every": 2, "log_every": 1}
    logreg = paper.Experiment("logreg", tiny, {}, (), companions=paper.RANK_1_FORWARD)
    monkeypatch.setattr(paper, "EXPERIMENTS", (logreg,))
    out = tmp_path / "repro"
    argv = ["reproduce", "--dataset", "tiny", "--estimators", "forward,backprop", "--threads", "1"]
    code, _, err = run([*argv, "--quiet", "--out", out], capsys)
    assert code == 0, err
    report = (out / "logreg" / "report.md").read_text()
    assert "| forward (K=1, normal, mean) |" in report
    assert "| forward (K=1, normal, mean, rank 1) |" in report
    assert "forward = forward (K=1, normal, mean);" in report  # claims use the dense run
