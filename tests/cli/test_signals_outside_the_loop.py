"""SIGINT and SIGTERM end a command with 130 or 143 and one line wherever they arrive: while the
run starts, during the final checkpoint, while the report is drawn; what was done stays
resumable and a resumed run ends as an uninterrupted one would."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from helpers import final_params

from forwardgrad.cli import main
from forwardgrad.cli import train as train_command
from forwardgrad.experiments import callbacks, loop

BEALE = ["train", "--problem", "beale", "--steps", "8", "--checkpoint-every", "3", "--quiet"]
SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143)]


def _signalling(function, number: int, when=lambda *args: True):
    """``function``, sending this process ``number`` first (when ``when(*args)`` holds)."""

    def wrapper(*args, **kwargs):
        if when(*args):
            os.kill(os.getpid(), number)
        return function(*args, **kwargs)

    return wrapper


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("number", "code"), SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_run_starts(number, code, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(loop, "start_run", _signalling(loop.start_run, number))
    assert main([*BEALE, "--out", str(run_dir)]) == code
    err = _one_line(capsys)
    assert f"interrupted by {signal.Signals(number).name}" in err
    assert "continue with: forwardgrad train --problem beale" in err  # nothing to resume yet
    monkeypatch.undo()
    assert main([*BEALE, "--out", str(run_dir)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(("number", "code"), SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_final_checkpoint(number, code, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    save = _signalling(callbacks.ckpt.save_checkpoint, number, when=lambda d, s, step: step == 8)
    monkeypatch.setattr(callbacks.ckpt, "save_checkpoint", save)
    assert main([*BEALE, "--out", str(run_dir)]) == code
    assert "interrupted after step 8, checkpoint saved" in _one_line(capsys)
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    assert main([*BEALE, "--out", str(tmp_path / "straight")]) == 0
    assert torch.equal(final_params(run_dir)["x"], final_params(tmp_path / "straight")["x"])
    assert (run_dir / "summary.json").is_file() and (run_dir / "report.md").is_file()


@pytest.mark.parametrize(("number", "code"), SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_report_is_drawn(number, code, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    reporting = train_command.reporting
    monkeypatch.setattr(
        reporting, "write_run_report", _signalling(reporting.write_run_report, number)
    )
    assert main([*BEALE, "--out", str(run_dir)]) == code
    err = _one_line(capsys)
    assert f"continue with: forwardgrad train --resume {run_dir}" in err
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    assert (run_dir / "report.md").is_file()


def test_signal_handlers_are_restored_after_the_command(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert main([*BEALE, "--out", str(tmp_path / "run")]) == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
