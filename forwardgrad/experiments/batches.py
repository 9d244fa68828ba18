"""From a data set's uint8 images to training batches: normalisation with the training split's
statistics, seeded mini-batches that resume exactly, and a held-out validation split."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from forwardgrad.seeds import derive_seed, seeded_generator


def _check_uint8(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images as loaded by load_dataset, got {images.dtype}.")


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation of the pixels of uint8 images, scaled to [0, 1].

    Compute them from the TRAIN split only and reuse them for the test split, so nothing about
    the test set leaks into training. For MNIST's train split: (0.1307, 0.3081).
    Exact: it works from the 256-bin histogram, in float64.
    """
    _check_uint8(images)
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum()
    mean = (counts * values).sum() / n
    var = (counts * (values - mean) ** 2).sum() / n
    return float(mean), float(var.sqrt())


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 images ``(N, 28, 28)`` -> float32 ``(N, 1, 28, 28)`` of ``(pixel / 255 - mean) / std``.

    ``mean`` and ``std`` are on the [0, 1] scale, from ``pixel_stats`` of the TRAIN split.
    """
    _check_uint8(images)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return (images.float() / 255 - mean) / std


# --------------------------------------------------------------------------- seeded batching


class ShuffledBatches:
    """Mini-batches of indices, reshuffled every epoch, reproducible and exactly resumable.

    Epoch ``e``'s order is ``torch.randperm(num_examples)`` from a ``torch.Generator`` seeded
    with ``derive_seed(seed, "batches", e)``, so the same seed gives every estimator the same
    batches in the same order, and an epoch's order does not depend on how many batches came
    before it.

    Iterating yields the int64 index tensors of the rest of the current epoch, then moves to
    the next epoch; ``for epoch in range(E): for idx in batches: ...`` runs E epochs. The last
    batch of an epoch is smaller when ``batch_size`` does not divide ``num_examples``; with
    ``drop_last=True`` it is skipped instead, so every batch has ``batch_size`` examples.

    ``state_dict()`` returns ``{"epoch", "position"}`` (examples already taken in this epoch,
    counted when a batch is yielded); ``load_state_dict`` restores it, and iteration resumes with
    exactly the batch that would have come next.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, drop_last: bool = False):
        if num_examples < 1 or batch_size < 1:
            raise ValueError(
                f"num_examples and batch_size must be positive, got {num_examples} and "
                f"{batch_size}."
            )
        if drop_last and batch_size > num_examples:
            raise ValueError(
                f"batch_size {batch_size} > num_examples {num_examples} with drop_last=True "
                "leaves no batch; lower batch_size or set drop_last=False."
            )
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}.")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def _epoch_end(self) -> int:
        return len(self) * self.batch_size if self.drop_last else self.num_examples

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of all examples in ``epoch``."""
        generator = seeded_generator(derive_seed(self.seed, "batches", epoch))
        return torch.randperm(self.num_examples, generator=generator)

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, end = self.epoch, self._epoch_end()
        order = self.permutation(epoch)
        while self.epoch == epoch:
            batch = order[self.position : self.position + self.batch_size]
            self.position += len(batch)
            if self.position >= end:
                self.epoch, self.position = epoch + 1, 0
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self._epoch_end():
            raise ValueError(
                f"state {dict(state)} is not a position of {self.num_examples} examples in "
                f"batches of {self.batch_size} (epoch >= 0, 0 <= position < {self._epoch_end()})."
            )
        self.epoch, self.position = epoch, position


def split_validation(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into held-out validation indices and the rest, e.g. for lr sweeps.

    ``round(n * fraction)`` examples, drawn by ``torch.randperm`` from a generator seeded with
    ``derive_seed(seed, "validation")``, go to validation. Both index tensors are sorted int64;
    index the train split with them, and give ``ShuffledBatches(len(train_idx), ...)`` batches
    ``train_idx[batch]``.
    """
    n_val = round(n * fraction)
    if not 0 < fraction < 1 or not 0 < n_val < n:
        raise ValueError(
            f"fraction {fraction} of {n} examples must leave at least one example on each side."
        )
    order = torch.randperm(n, generator=seeded_generator(derive_seed(seed, "validation")))
    return order[n_val:].sort().values, order[:n_val].sort().values
