"""Checkpoint files: atomic save, keep the last two, skip corrupt ones, restore RNG states."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from forwardgrad.experiments.checkpoints import (
    CheckpointError,
    capture_rng_state,
    list_checkpoints,
    load_latest_checkpoint,
    read_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def test_save_then_load_round_trips(tmp_path):
    state = {"weights": torch.arange(6.0).reshape(2, 3), "step": 7, "nested": {"a": [1, 2]}}
    save_checkpoint(tmp_path, state, step=7)
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded.step == 7
    assert loaded.skipped == []
    assert torch.equal(loaded.state["weights"], state["weights"])
    assert loaded.state["nested"] == {"a": [1, 2]}


def test_keeps_only_the_newest_two_and_no_temporary_files(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, {"step": step}, step=step)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [40, 30]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000030.ckpt",
        "step-00000040.ckpt",
    ]


def test_empty_or_missing_directory_has_no_checkpoint(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
    assert load_latest_checkpoint(tmp_path / "absent") is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "empty"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage):
    save_checkpoint(tmp_path, {"value": torch.ones(100)}, step=1)
    newest = save_checkpoint(tmp_path, {"value": torch.full((100,), 2.0)}, step=2)
    blob = bytearray(newest.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[-50] ^= 0xFF
    elif damage == "header":
        blob[:5] = b"XXXXX"
    else:
        blob = bytearray()
    newest.write_bytes(bytes(blob))

    loaded = load_latest_checkpoint(tmp_path)
    assert loaded.step == 1
    assert torch.equal(loaded.state["value"], torch.ones(100))
    assert [path for path, _ in loaded.skipped] == [newest]
    with pytest.raises(CheckpointError, match="step-00000002"):
        read_checkpoint(newest)


def test_all_corrupt_is_one_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, {"x": 1}, step=3)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest_checkpoint(tmp_path)


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, {}, step=1, keep=0)


# The global numpy state is the one being tested, so the legacy API is the point here.
def test_rng_states_restore_exactly(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)  # noqa: NPY002
    random.seed(3)
    save_checkpoint(tmp_path, {"rng": capture_rng_state()}, step=0)
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002

    torch.manual_seed(99)
    np.random.seed(99)  # noqa: NPY002
    random.seed(99)
    restore_rng_state(load_latest_checkpoint(tmp_path).state["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])  # noqa: NPY002
    assert random.random() == expected[2]
