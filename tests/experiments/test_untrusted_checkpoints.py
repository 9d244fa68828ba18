"""A checkpoint is untrusted input: it is read with ``torch.load(weights_only=True)``, so a crafted
pickle runs no code and is refused, and one with missing keys is a one-line error."""

from __future__ import annotations

import hashlib
import io
import pathlib

import pytest
import torch

from forwardgrad.cli import main
from forwardgrad.experiments.checkpoints import (
    MAGIC,
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_latest_checkpoint,
    read_checkpoint,
    save_checkpoint,
)


class _TouchesAFile:
    """Unpickling this calls ``Path.touch(marker)``: proof that code from the file ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _write_crafted(directory: pathlib.Path, step: int, marker: pathlib.Path) -> pathlib.Path:
    """A checkpoint whose header and digest are right and whose payload runs code when fully
    unpickled: the digest proves integrity, not who wrote the file."""
    buffer = io.BytesIO()
    torch.save({"step": step, "payload": _TouchesAFile(marker)}, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    path = checkpoint_path(directory, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MAGIC + digest + b"\n" + payload)
    return path


def test_a_crafted_pickle_runs_no_code_and_the_previous_checkpoint_is_used(tmp_path):
    marker = tmp_path / "code-ran"
    save_checkpoint(tmp_path / "ckpt", {"value": torch.ones(3)}, step=1)
    crafted = _write_crafted(tmp_path / "ckpt", 2, marker)

    loaded = load_latest_checkpoint(tmp_path / "ckpt")
    assert loaded.step == 1 and torch.equal(loaded.state["value"], torch.ones(3))
    assert [path for path, _ in loaded.skipped] == [crafted]
    assert "refused" in loaded.skipped[0][1]
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(crafted)
    assert not marker.exists()


def _finished_run(tmp_path: pathlib.Path, capsys) -> pathlib.Path:
    run_dir = tmp_path / "run"
    argv = ["train", "--problem", "beale", "--steps", "6", "--checkpoint-every", "3", "--quiet"]
    assert main([*argv, "--out", str(run_dir)]) == 0
    capsys.readouterr()
    return run_dir


def test_resume_refuses_a_crafted_checkpoint_in_one_line(tmp_path, capsys):
    run_dir, marker = _finished_run(tmp_path, capsys), tmp_path / "code-ran"
    for _, path in list_checkpoints(run_dir / "checkpoints"):
        path.unlink()
    _write_crafted(run_dir / "checkpoints", 9, marker)

    code = main(["train", "--resume", str(run_dir), "--steps", "12", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "refused" in err and "Traceback" not in err
    assert not marker.exists()


def test_every_checkpoint_of_a_run_loads_without_unpickling_objects(tmp_path, capsys):
    run_dir = _finished_run(tmp_path, capsys)
    for _, path in list_checkpoints(run_dir / "checkpoints"):
        blob = path.read_bytes()[len(MAGIC) + 65 :]
        state = torch.load(io.BytesIO(blob), weights_only=True)
        assert {"model", "optimizer", "estimator", "data", "rng"} <= set(state)


def test_a_checkpoint_with_missing_keys_is_a_one_line_error(tmp_path, capsys):
    run_dir = _finished_run(tmp_path, capsys)
    save_checkpoint(run_dir / "checkpoints", {"model": {}}, step=9)

    code = main(["train", "--resume", str(run_dir), "--steps", "12", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "lacks step" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("step", -3),
        ("step", "three"),
        ("step_times_s", {"a": 1}),
        ("model", {"x": torch.ones(5)}),
        ("estimator", "seed"),
        ("rng", {"torch": torch.ones(2)}),
        ("rng", []),
    ],
)
def test_a_checkpoint_with_values_of_the_wrong_kind_is_a_one_line_error(
    key, value, tmp_path, capsys
):
    run_dir = _finished_run(tmp_path, capsys)
    newest = list_checkpoints(run_dir / "checkpoints")[0][1]
    state = read_checkpoint(newest)
    state[key] = value
    save_checkpoint(run_dir / "checkpoints", state, step=9)

    code = main(["train", "--resume", str(run_dir), "--steps", "12", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "does not fit this run" in err and "Traceback" not in err
