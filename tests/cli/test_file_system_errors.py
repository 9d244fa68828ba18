"""The file system refusing a write is one line, not a traceback: a bad --out is exit 2, a disk
that fills up midway is exit 1, and neither leaves a partial file or an unresumable run."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import final_params, read_metrics

from forwardgrad.cli import main

REPO = Path(__file__).resolve().parents[2]
BEALE = ["train", "--problem", "beale", "--steps", "3", "--quiet"]


@pytest.mark.parametrize(
    "out",
    ["{file}/run", "/proc/forwardgrad-run", "/sys/forwardgrad-run", "{tmp}/" + "x" * 300],
    ids=["under a file", "proc", "sys", "300 characters"],
)
def test_an_unusable_out_is_one_line_and_exit_2(out, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    out = out.format(file=tmp_path / "file", tmp=tmp_path)
    code = main([*BEALE, "--out", out])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "choose another directory" in err, err


def test_plot_out_onto_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run_dir in runs:
        assert main([*BEALE, "--out", str(run_dir)]) == 0
    (tmp_path / "file").write_text("keep me")
    code = main(["plot", *map(str, runs), "--out", str(tmp_path / "file")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "File exists" in err, err
    assert (tmp_path / "file").read_text() == "keep me"


def _with_file_size_limit(limit: int):
    """For the child: files may not grow past ``limit`` bytes (as on a full disk), and writing
    past it raises OSError (EFBIG) instead of killing the process with SIGXFSZ."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_file_size


def _run_limited(argv: list[str], limit: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "forwardgrad", *argv],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=_with_file_size_limit(limit),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _leftovers(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.rglob("*") if ".tmp" in p.name]


# Checkpoints of beale take about 23 kB, its plots 28-81 kB: with files limited to 40 kB the
# checkpoints fit, metrics.csv fills up after about 570 rows, and the plots never fit.
LIMIT = 40_000
LONG = ["train", "--problem", "beale", "--steps", "1500", "--log-every", "1", "--quiet"]


def test_a_full_disk_midway_exits_1_in_one_line_and_the_run_resumes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [*LONG, "--checkpoint-every", "100", "--threads", "1"]
    failed = _run_limited([*argv, "--out", str(run_dir)], LIMIT)
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.count("\n") == 1 and "File too large" in failed.stderr
    assert "--resume" in failed.stderr and "Traceback" not in failed.stderr
    assert _leftovers(run_dir) == []

    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0, capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    assert torch.equal(final_params(run_dir)["x"], final_params(tmp_path / "straight")["x"])
    rows = [read_metrics(d) for d in (run_dir, tmp_path / "straight")]
    assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]]


def test_a_full_disk_while_plotting_leaves_no_partial_png(tmp_path, capsys):
    run_dir = tmp_path / "run"
    failed = _run_limited([*BEALE, "--out", str(run_dir)], LIMIT)
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert _leftovers(run_dir) == [] and (run_dir / "summary.json").is_file()
    assert all(png.stat().st_size > 0 for png in run_dir.glob("*.png"))
    assert main(["plot", str(run_dir)]) == 0, capsys.readouterr().err


def test_a_full_disk_before_config_json_leaves_an_empty_directory_to_rerun_in(tmp_path):
    run_dir = tmp_path / "run"
    argv = [*BEALE, "--out", str(run_dir)]
    failed = _run_limited(argv, 200)  # config.json takes about 1 kB
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1, failed.stderr
    assert "then continue with: forwardgrad train --problem beale" in failed.stderr
    assert list(run_dir.iterdir()) == []
    assert main(argv) == 0
