"""Settings beyond what a run can use are refused in one line that names the setting, before
they can crash the process, exhaust its memory or overflow a 64-bit integer."""

from __future__ import annotations

import pytest
from helpers import install_tiny_dataset

from forwardgrad.cli import main
from forwardgrad.errors import ConfigurationError
from forwardgrad.experiments import TrainConfig, limits

TINY = ["train", "--problem", "logreg", "--dataset", "tiny", "--quiet"]
TOO_MUCH = {
    "threads": (["--threads", "100000"], "threads must be at most 1024"),
    "tangents": (["--tangents", "1000000000"], "tangents 1000000000 needs about"),
    "batch": (["--batch-size", "100000"], "batch_size 100000 is larger than the 96 training"),
    "steps": (["--steps", "99999999999999999999"], "steps 99,999,999,999,999,999,999 asks for"),
    "epochs": (["--epochs", "1e300"], "epochs 1e+300 asks for"),
    "seed": (["--seed", "99999999999999999999"], "seed must be at most 9223372036854775807"),
}


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    return install_tiny_dataset(monkeypatch, tmp_path / "data", 96, 40)


@pytest.mark.parametrize(("flags", "words"), TOO_MUCH.values(), ids=TOO_MUCH.keys())
def test_too_much_is_one_line_naming_the_setting(flags, words, tiny_data, tmp_path, capsys):
    code = main([*TINY, *flags, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "run").exists()


def test_tangents_are_bounded_by_the_memory_available(tiny_data, tmp_path, monkeypatch, capsys):
    # logreg has 7,850 parameters: 1,000 tangents take 31 MB, 10 take 0.4 MB.
    monkeypatch.setattr(limits, "available_memory_bytes", lambda: 2**20)
    code = main([*TINY, "--tangents", "1000", "--out", str(tmp_path / "big")])
    err = capsys.readouterr().err
    assert code == 2 and "choose at most 31 tangents" in err, err
    argv = [*TINY, "--tangents", "10", "--steps", "2", "--batch-size", "8", "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "small")]) == 0, capsys.readouterr().err


def test_the_largest_seed_trains(tmp_path, capsys):
    argv = [
        "train",
        "--problem",
        "beale",
        "--steps",
        "2",
        "--quiet",
        "--seed",
        str(limits.MAX_SEED),
    ]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err


def test_the_memory_bound_counts_what_the_tangents_hold(tiny_data, monkeypatch):
    """Dense tangents are copies of the parameters; rank-2 ones are factors (an MLP's are 157
    times smaller); activity perturbation's are the perturbed layers' outputs for the batch."""
    monkeypatch.setattr(limits, "available_memory_bytes", lambda: 2**30)
    mlp = dict(problem="mlp", dataset="tiny", batch_size=16, steps=1)
    with pytest.raises(ConfigurationError, match="tangents 200 needs about 1.4 GiB"):
        TrainConfig(**mlp, tangents=200).validate()
    TrainConfig(**mlp, tangents=200, tangent_rank=2).validate()
    with pytest.raises(ConfigurationError, match="10,000 tangents of 32,928 numbers each"):
        TrainConfig(**mlp, estimator="activity", tangents=10_000).validate()
    TrainConfig(**mlp, estimator="activity", tangents=1_000).validate()
