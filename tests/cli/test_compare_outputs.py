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


def test_missing_data_is_said_with_the_flags_and_leaves_no_run_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "runs" / "new"
    argv = ["train", "--problem", "logreg", "--data-dir", str(tmp_path / "empty"), "--quiet"]
    code = main([*argv, "--no-download", "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert 1 < len(lines) <= 5, err
    assert all(len(line) <= 100 for line in lines if str(tmp_path) not in line), err
    assert lines[0].startswith("forwardgrad: error: mnist data not found")
    assert lines[1].strip() == str(tmp_path / "empty" / "mnist")
    assert "--no-download was given" in lines[0] and "--data-dir DIR" in err
    assert "data_dir" not in err and "download=False" not in err and "Traceback" not in err
    assert not out.exists() and not out.parent.exists()  # no empty run directory left


def test_train_lr_sweep_trains_at_the_chosen_rate_and_keeps_the_record(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--problem", "beale", "--estimator", "backprop", "--steps", "30"]
    sweep = ["--lr-sweep", "0.001,0.01", "--sweep-steps", "10", "--quiet"]
    assert main([*argv, *sweep, "--out", str(out)]) == 0, capsys.readouterr().err
    record = json.loads((out / "lr_sweep.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lr"] == record["used_lr"] == record["best_lr"]


def test_a_comparison_whose_steps_cannot_be_timed_still_reports(tmp_path, monkeypatch, capsys):
    from forwardgrad.cli import runs as cli_runs
    from forwardgrad.errors import ConfigurationError

    def refuse(*args, **kwargs):
        raise ConfigurationError("unknown estimator 'newer'.")

    monkeypatch.setattr(cli_runs, "time_runs", refuse)
    out = tmp_path / "cmp"
    (out).mkdir()
    (out / "step_timing.json").write_text("{}")  # an earlier comparison's: not to be used
    argv = ["compare", "--problem", "beale", "--estimators", "forward,backprop", "--steps", "5"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    assert "steps not timed: unknown estimator" in capsys.readouterr().err
    assert not (out / "step_timing.json").exists()
    assert "taken at different moments" in (out / "report.md").read_text()


def test_sweep_candidates_print_where_they_start_and_end(tmp_path, capsys):
    argv = ["compare", "--problem", "beale", "--estimators", "forward", "--steps", "40"]
    sweep = ["--lr-sweep", "0.001,0.01", "--sweep-steps", "30", "--out", str(tmp_path / "c")]
    assert main([*argv, *sweep]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len([line for line in lines if "lr sweep 0.001:" in line]) == 2
    assert any("the lr sweep chose 0.01 (of 0.001, 0.01" in line for line in lines)
