"""Fuzzing the command line: whatever the flag values, ``forwardgrad`` ends with a documented exit
code (0, 1, 2, 130 or 143) and never a traceback."""

from __future__ import annotations

import contextlib
import io
import itertools
import tempfile
from pathlib import Path

import pytest
from helpers import install_tiny_dataset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from forwardgrad.cli import main

EXIT_CODES = {0, 1, 2, 130, 143}
_NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "nan", "-inf", "1e999", "0x10", "1_000", " 3", "١"]),
)
_ANY = st.one_of(_NUMBERS, st.text(max_size=12))
# Values a run can take quickly, or that are refused: a fuzzed run must stay tiny.
_SMALL = st.one_of(st.integers(1, 4).map(str), st.integers(-5, 0).map(str), _ANY.filter(
    lambda text: not text.strip().lstrip("+").isdigit() or int(text) > 10**12
))  # fmt: skip
_FLAGS = {
    "--problem": st.one_of(st.sampled_from(["beale", "rosenbrock", "logreg", "mlp"]), _ANY),
    "--dataset": st.one_of(st.just("tiny"), _ANY),
    "--estimator": st.one_of(
        st.sampled_from(["forward", "zeroth-order", "backprop", "activity"]), _ANY
    ),
    "--tangent-rank": _SMALL,
    "--guess": st.one_of(st.just("local"), _ANY),
    "--steps": _SMALL,
    "--tangents": _SMALL,
    "--dim": _SMALL,
    "--threads": _SMALL,
    "--lr": _NUMBERS,
    "--lr-decay": _NUMBERS,
    "--eps": _NUMBERS,
    "--seed": _NUMBERS,
    "--batch-size": _NUMBERS,
    "--eval-every": _NUMBERS,
    "--log-every": _NUMBERS,
    "--checkpoint-every": _NUMBERS,
    "--distribution": st.one_of(st.sampled_from(["normal", "rademacher", "orthogonal"]), _ANY),
    "--combine": _ANY,
    "--optimizer": st.one_of(st.sampled_from(["sgd", "adam", "frank-wolfe"]), _ANY),
    "--constraint": _ANY,
    "--epochs": _NUMBERS,
}
_SWITCHES = ["--local-losses", "--no-averaging"]
_RUNS = itertools.count()


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    """The learnable 96 + 40-example "tiny" data set, so image problems can run too."""
    return install_tiny_dataset(monkeypatch, tmp_path / "data", 96, 40)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    flags=st.dictionaries(st.sampled_from(sorted(_FLAGS)), st.none(), max_size=6).flatmap(
        lambda chosen: st.fixed_dictionaries({flag: _FLAGS[flag] for flag in chosen})
    ),
    switches=st.lists(st.sampled_from(_SWITCHES), unique=True),
)
def test_any_train_flags_end_in_a_documented_code_without_a_traceback(tiny_data, flags, switches):
    # Defaults that a fuzzed flag given later overrides; no data set is ever downloaded.
    argv = ["train", "--quiet", "--no-download", "--problem", "beale", "--steps", "2"]
    argv += ["--dataset", "tiny", "--batch-size", "16", *switches]
    for flag, value in flags.items():
        argv += [f"{flag}={value}"]
    with tempfile.TemporaryDirectory() as directory:
        argv += ["--out", str(Path(directory) / f"run-{next(_RUNS)}")]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    event(f"exit code {code}")  # pytest --hypothesis-show-statistics shows how many trained
    assert code in EXIT_CODES, (argv, code, err.getvalue())
    assert "Traceback" not in err.getvalue(), argv
    if code != 0:
        assert err.getvalue().count("\n") == 1, (argv, err.getvalue())


@settings(max_examples=15, deadline=None)
@given(paths=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3))
def test_any_plot_paths_end_in_a_documented_code_without_a_traceback(paths):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["plot", *(f"/nonexistent/{path}" for path in paths)])
    assert code in EXIT_CODES and "Traceback" not in err.getvalue(), (paths, err.getvalue())
