"""From images to batches: normalisation with the train split's statistics, seeded mini-batches
that resume exactly, and the held-out validation split."""

import numpy as np
import pytest
import torch

from forwardgrad.experiments.batches import (
    ShuffledBatches,
    normalize,
    pixel_stats,
    split_validation,
)

# --------------------------------------------------------------------------- normalisation


def test_pixel_stats_and_normalize():
    images = torch.tensor([[[0, 255], [255, 0]]], dtype=torch.uint8).expand(3, 2, 2)
    mean, std = pixel_stats(images)
    assert mean == pytest.approx(0.5) and std == pytest.approx(0.5)

    rng = np.random.default_rng(1)
    train = torch.from_numpy(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8))
    mean, std = pixel_stats(train)
    pixels = train.double() / 255
    assert mean == pytest.approx(pixels.mean().item(), abs=1e-12)
    assert std == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-12)

    x = normalize(train, mean, std)
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert normalize(train.unsqueeze(1), mean, std).shape == (50, 1, 28, 28)

    test = train[:7]  # other data is normalised with the train statistics
    torch.testing.assert_close(normalize(test, mean, std), x[:7])


def test_normalize_wants_uint8():
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.zeros(2, 28, 28), 0.1, 0.3)
    with pytest.raises(TypeError, match="uint8"):
        pixel_stats(torch.zeros(2, 28, 28))


# --------------------------------------------------------------------------- batching


def take(batches: ShuffledBatches, count: int) -> list[torch.Tensor]:
    """The next ``count`` batches, across epochs."""
    out = []
    while len(out) < count:
        for batch in batches:
            out.append(batch)
            if len(out) == count:
                break
    return out


def test_each_epoch_is_a_permutation_split_into_batches():
    batches = ShuffledBatches(10, 4, seed=0)
    assert len(batches) == 3
    epochs = []
    for _ in range(3):
        sizes_and_batches = list(batches)
        assert [len(b) for b in sizes_and_batches] == [4, 4, 2]  # the last partial batch is kept
        order = torch.cat(sizes_and_batches)
        assert sorted(order.tolist()) == list(range(10))
        assert order.dtype == torch.int64
        epochs.append(order)
    assert batches.state_dict() == {"epoch": 3, "position": 0}
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch
    assert torch.equal(epochs[1], batches.permutation(1))


def test_drop_last():
    batches = ShuffledBatches(10, 4, seed=0, drop_last=True)
    assert len(batches) == 2
    first = list(batches)
    assert [len(b) for b in first] == [4, 4]
    assert torch.equal(torch.cat(first), batches.permutation(0)[:8])
    assert batches.state_dict() == {"epoch": 1, "position": 0}
    assert len(ShuffledBatches(8, 4, seed=0, drop_last=True)) == 2


def test_same_seed_same_batches_other_seed_other_batches():
    a, b, c = (ShuffledBatches(100, 7, seed=s) for s in (5, 5, 6))
    first, second, third = take(a, 40), take(b, 40), take(c, 40)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(first, third, strict=True))
    # and it does not depend on global random state
    torch.manual_seed(123)
    again = take(ShuffledBatches(100, 7, seed=5), 40)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))


def test_epoch_order_depends_only_on_seed_and_epoch():
    batches = ShuffledBatches(50, 8, seed=3)
    batches.load_state_dict({"epoch": 4, "position": 0})
    assert torch.equal(torch.cat(list(batches)), ShuffledBatches(50, 8, seed=3).permutation(4))
    orders = {
        tuple(ShuffledBatches(50, 8, seed=s).permutation(e).tolist())
        for s in range(4)
        for e in range(4)
    }
    assert len(orders) == 16


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("stop", [0, 1, 3, 4, 5, 9])
def test_resume_continues_with_exactly_the_next_batch(drop_last, stop):
    uninterrupted = take(ShuffledBatches(18, 5, seed=9, drop_last=drop_last), 12)

    first = ShuffledBatches(18, 5, seed=9, drop_last=drop_last)
    before = take(first, stop)
    state = first.state_dict()
    assert set(state) == {"epoch", "position"}

    resumed = ShuffledBatches(18, 5, seed=9, drop_last=drop_last)
    resumed.load_state_dict(state)
    after = take(resumed, 12 - stop)
    assert all(torch.equal(x, y) for x, y in zip(before + after, uninterrupted, strict=True))


def test_breaking_out_and_iterating_again_continues_the_epoch():
    batches = ShuffledBatches(12, 3, seed=1)
    for i, _ in enumerate(batches):
        if i == 1:
            break
    assert batches.state_dict() == {"epoch": 0, "position": 6}
    rest = list(batches)
    assert torch.equal(torch.cat(rest), batches.permutation(0)[6:])


def test_batch_arguments_are_checked():
    with pytest.raises(ValueError, match="positive"):
        ShuffledBatches(0, 4, seed=0)
    with pytest.raises(ValueError, match="positive"):
        ShuffledBatches(10, 0, seed=0)
    with pytest.raises(ValueError, match="leaves no batch"):
        ShuffledBatches(3, 4, seed=0, drop_last=True)
    with pytest.raises(ValueError, match="non-negative"):
        ShuffledBatches(3, 4, seed=-1)
    batches = ShuffledBatches(10, 4, seed=0)
    for state in ({"epoch": -1, "position": 0}, {"epoch": 0, "position": 10}):
        with pytest.raises(ValueError, match="is not a position"):
            batches.load_state_dict(state)
    with pytest.raises(ValueError, match="is not a position"):
        ShuffledBatches(10, 4, seed=0, drop_last=True).load_state_dict({"epoch": 0, "position": 8})


# --------------------------------------------------------------------------- validation split


def test_split_validation():
    train, val = split_validation(100, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert torch.equal(train, train.sort().values) and train.dtype == torch.int64
    again = split_validation(100, 0.1, seed=0)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    assert not torch.equal(split_validation(100, 0.1, seed=1)[1], val)
    assert len(split_validation(60_000, 1 / 6, seed=0)[1]) == 10_000


@pytest.mark.parametrize("n, fraction", [(100, 0.0), (100, 1.0), (100, -0.1), (3, 0.1), (3, 0.9)])
def test_split_validation_needs_both_sides(n, fraction):
    with pytest.raises(ValueError, match="at least one example on each side"):
        split_validation(n, fraction, seed=0)
