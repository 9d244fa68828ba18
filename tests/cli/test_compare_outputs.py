"""What a comparison leaves behind and says on the way: run i of N on each progress line, a
closing line per run with its final figures, one checkpoint per finished run, alternated step
timing beside the runs."""

from __future__ import annotations

import json

from forwardgrad.cli import main
from forwardgrad.experiments.checkpoints import list_checkpoints


def test_compare_progress_checkpoints_and_step_timing(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--problem", "beale", "--estimators", "forward,backprop", "--lr", "0.01"]
    code = main([*argv, "--steps", "40", "--checkpoint-every", "10", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = err.splitlines()
    assert any(line.startswith("run 1/2, beale: forward") for line in lines)
    assert any(line.startswith("run 2/2, beale: backprop") for line in lines)
    closing = [line for line in lines if "done after 40 steps" in line]
    assert len(closing) == 2 and all("distance to optimum" in line for line in closing)
    for run_dir in (out / "forward-k-1-normal-mean", out / "backprop"):
        assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [40]
    timing = json.loads((out / "step_timing.json").read_text())
    assert set(timing["runs"]) == {"forward-k-1-normal-mean", "backprop"}
    assert "Time ÷ backprop: " in (out / "report.md").read_text()
