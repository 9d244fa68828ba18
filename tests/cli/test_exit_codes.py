"""How the command line ends: forwardgrad's own errors in one line with their exit code, a bug
with its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from forwardgrad import reporting
from forwardgrad.cli import main
from forwardgrad.distributed import RankFailure
from forwardgrad.errors import CheckpointError, ConfigurationError, DataError, NonFiniteLoss

REPO = Path(__file__).resolve().parents[2]


def failing(error: BaseException):
    def plot_runs(*args, **kwargs):
        raise error

    return plot_runs


@pytest.mark.parametrize(
    "error",
    [
        ConfigurationError("steps must be at least 1, got 0."),
        DataError("tiny data not found; put the files in /data."),
        CheckpointError("step-00000004.ckpt is corrupt or truncated."),
        NonFiniteLoss(float("nan")),
    ],
    ids=lambda error: type(error).__name__,
)
def test_forwardgrad_errors_are_one_line_and_exit_2(error, monkeypatch, capsys):
    monkeypatch.setattr(reporting, "plot_runs", failing(error))
    assert main(["plot", "somewhere"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"forwardgrad: error: {error}\n"


def test_a_distributed_failure_exits_3(monkeypatch, capsys):
    monkeypatch.setattr(reporting, "plot_runs", failing(RankFailure("rank 1 died.")))
    assert main(["plot", "somewhere"]) == 3
    assert capsys.readouterr().err == "forwardgrad: error: rank 1 died.\n"


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug"), KeyError("bug")])
def test_any_other_exception_is_a_bug_and_propagates(error, monkeypatch):
    monkeypatch.setattr(reporting, "plot_runs", failing(error))
    with pytest.raises(type(error)):
        main(["plot", "somewhere"])


def test_a_bug_shows_its_traceback_from_the_command(tmp_path):
    script = (
        "import sys\n"
        "from forwardgrad import reporting\n"
        "from forwardgrad.cli import main\n"
        "def plot_runs(*args, **kwargs):\n"
        "    raise RuntimeError('a bug in forwardgrad')\n"
        "reporting.plot_runs = plot_runs\n"
        "sys.exit(main(['plot', 'somewhere']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "RuntimeError: a bug in forwardgrad" in done.stderr
