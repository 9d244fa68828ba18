"""The one atomic-write helper: a file appears whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from forwardgrad.experiments import files
from forwardgrad.experiments.files import atomic_file, atomic_write, write_json


def test_writes_bytes_and_text_and_replaces_an_old_file(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    assert atomic_write(target, "new ü") == target
    assert target.read_text(encoding="utf-8") == "new ü"
    atomic_write(target, b"\x89PNG")
    assert target.read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_a_failure_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("{}")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(target, binary=False) as file:
            file.write('{"half": ')
            raise RuntimeError("disk full")
    assert target.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_the_temporary_is_hidden_in_the_target_directory_keeps_the_suffix_and_is_synced(
    tmp_path, monkeypatch
):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((a, b)), real_replace(a, b)))
    target = tmp_path / "data" / "train-images-idx3-ubyte.gz"
    target.parent.mkdir()
    with atomic_file(target) as file:
        temporary = Path(file.name)
        file.write(b"bytes")
    assert temporary.parent == target.parent
    assert temporary.name.startswith(".") and temporary.suffix == ".gz"
    assert temporary.name != target.name and not temporary.exists()
    assert renamed == [(temporary, target)]
    assert len(synced) == 2  # the file before the rename, the directory after it


def test_the_temporary_is_created_exclusively(tmp_path, monkeypatch):
    names = iter(["taken", "free"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    target = tmp_path / "summary.json"
    squatter = tmp_path / ".summary.taken.tmp.json"
    squatter.write_text("someone else's")
    write_json(target, {"steps": 3})
    assert squatter.read_text() == "someone else's"  # never opened, never removed
    assert target.read_text() == '{\n  "steps": 3\n}\n'


def test_permissions_follow_the_umask_like_a_plain_open(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    atomic_write(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode


def test_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "summary.json", {"loss": float("nan")})
    assert not list(tmp_path.iterdir())
