"""--cosine-every on train, compare and reproduce."""

from __future__ import annotations

import pytest

from forwardgrad.cli import main
from forwardgrad.cli.commands import build_parser
from forwardgrad.cli.compare import _reproduce_plan
from forwardgrad.experiments import paper


def plan(tmp_path, *flags: str) -> dict[tuple[str, str], int]:
    args = build_parser().parse_args(
        ["reproduce", "--estimators", "forward,backprop", "--problems", "beale,logreg,mlp,cnn",
         *flags]
    )  # fmt: skip
    return {
        (p.run_dir.parent.name, p.run_dir.name): p.config.cosine_every
        for p in _reproduce_plan(args, tmp_path)
    }


def test_reproduce_measures_the_image_problems_and_the_flag_overrides(tmp_path):
    planned = plan(tmp_path)
    assert planned[("beale", "backprop")] == 0
    assert planned[("mlp", "forward-k-1-normal-mean")] == paper.COSINE_EVERY
    assert planned[("mlp", "forward-k-1-normal-mean-own-lr")] == paper.COSINE_EVERY
    assert planned[("logreg", "backprop")] == paper.COSINE_EVERY
    assert 0 < planned[("cnn", "backprop")] <= 20  # its quick budget is 40 steps
    assert set(plan(tmp_path, "--cosine-every", "7").values()) == {7}


def test_train_flag_reaches_the_config(tmp_path, capsys):
    argv = ["train", "--problem", "beale", "--steps", "4", "--quiet", "--cosine-every", "2"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert '"cosine_every": 2' in (tmp_path / "run" / "config.json").read_text()


@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_negative_interval_exits_2_in_one_line(command, tmp_path, capsys):
    argv = [command, "--problem", "beale", "--cosine-every", "-1", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cosine_every must be at least 0" in err and "Traceback" not in err
