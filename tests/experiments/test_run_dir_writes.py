"""Every write in a run directory goes through the atomic helper: a name planted in the directory
(a symlink to a file elsewhere, a stale temporary) is replaced or skipped, never written through."""

from __future__ import annotations

from pathlib import Path

import pytest

from forwardgrad.cli import main
from forwardgrad.experiments import files
from forwardgrad.experiments.files import atomic_write, open_for_append


def test_a_symlink_squatting_the_temporary_name_is_skipped_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    names = iter(["taken", "free"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    (tmp_path / ".report.taken.tmp.md").symlink_to(victim)
    atomic_write(tmp_path / "report.md", "new")
    assert victim.read_text() == "precious"
    assert (tmp_path / "report.md").read_text() == "new"


def test_a_symlink_at_the_target_is_replaced_and_its_file_left_alone(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "summary.json").symlink_to(victim)
    atomic_write(tmp_path / "summary.json", "{}")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "summary.json").is_symlink()


def test_appending_refuses_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "metrics.csv").symlink_to(victim)
    with pytest.raises(OSError):
        open_for_append(tmp_path / "metrics.csv")
    assert victim.read_text() == "precious"


def test_plot_leaves_files_behind_symlinks_in_the_run_directory_untouched(tmp_path, capsys):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    argv = ["train", "--problem", "beale", "--steps", "5", "--quiet", "--out", str(run_dir)]
    assert main(argv) == 0
    elsewhere.mkdir()
    planted = [
        "report.md.tmp",
        "report.md",
        "config.json.tmp",
        *(p.name for p in run_dir.glob("*.png")),
    ]
    assert len(planted) > 3  # the run drew its plots
    for name in planted:
        victim = elsewhere / name
        victim.write_text("precious")
        (run_dir / name).unlink(missing_ok=True)
        (run_dir / name).symlink_to(victim)

    assert main(["plot", str(run_dir)]) == 0, capsys.readouterr().err
    assert all((elsewhere / name).read_text() == "precious" for name in planted)
    for png in run_dir.glob("*.png"):
        assert not png.is_symlink() and png.read_bytes().startswith(b"\x89PNG")
    assert not (run_dir / "report.md").is_symlink()
    assert Path(run_dir / "report.md").read_text().startswith("# ")


def test_resume_refuses_a_checkpoint_folder_that_links_elsewhere(tmp_path, capsys):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    argv = ["train", "--problem", "beale", "--steps", "5", "--quiet", "--out", str(run_dir)]
    assert main(argv) == 0
    (run_dir / "checkpoints").rename(elsewhere)
    (run_dir / "checkpoints").symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--steps", "9", "--quiet"]) == 2
    assert "checkpoints is a symlink" in capsys.readouterr().err
    assert sorted(p.name for p in elsewhere.iterdir()) == before
