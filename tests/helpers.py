"""Shared test helpers: tiny learnable IDX data sets (so no test needs the real MNIST),
readers of what a run directory holds, and a reducer that stands for two identical ranks."""

from __future__ import annotations

import argparse
import contextlib
import csv
from pathlib import Path

import numpy as np
import torch

from forwardgrad.experiments import TrainConfig
from forwardgrad.experiments import datasets as data
from forwardgrad.experiments.checkpoints import list_checkpoints, read_checkpoint


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes: magic 00 00 08 <ndim>, big-endian sizes, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_tiny_dataset(directory: Path, train_size: int, test_size: int, seed: int = 0) -> Path:
    """Learnable 28x28 images in the four MNIST files: class k lights up row block k."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train_size), ("t10k", test_size)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 60, (count, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 3, 4:24] = 250
        write_idx(directory / f"{split}-images-idx3-ubyte", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte", labels)
    return directory


def tiny_spec(train_size: int, test_size: int) -> data.DatasetSpec:
    """The spec under which the data set is registered as "tiny" (no hashes, no mirrors)."""
    return data.DatasetSpec(
        name="tiny",
        mirrors=(),
        sha256=None,
        gz_md5=None,
        train_size=train_size,
        test_size=test_size,
    )


def install_tiny_dataset(monkeypatch, root: Path, train_size: int, test_size: int) -> Path:
    """Register "tiny", write it under ``root/tiny`` and point FORWARDGRAD_DATA_DIR at root."""
    monkeypatch.setitem(data.DATASETS, "tiny", tiny_spec(train_size, test_size))
    write_tiny_dataset(root / "tiny", train_size, test_size)
    monkeypatch.setenv("FORWARDGRAD_DATA_DIR", str(root))
    return root


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv, as strings."""
    with open(run_dir / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state of the run's newest checkpoint."""
    return read_checkpoint(list_checkpoints(run_dir / "checkpoints")[0][1])["model"]


def image_config(data_dir: Path, **changes) -> TrainConfig:
    """A short logreg run on the "tiny" data set in ``data_dir``, one thread, every step logged."""
    values = dict(
        problem="logreg",
        dataset="tiny",
        data_dir=str(data_dir),
        batch_size=16,
        steps=12,
        lr=0.05,
        eval_every=5,
        log_every=1,
        checkpoint_every=4,
        threads=1,
    )
    return TrainConfig(**{**values, **changes})


# Frank-Wolfe with its own step size 2/(t+2) (add constraint=...).
FRANK_WOLFE = {"optimizer": "frank-wolfe", "lr": "2/(t+2)", "lr_decay": 0.0}


class Doubling:
    """A reducer for two identical ranks: every sum is twice this process's numbers."""

    def __init__(self):
        self.sizes = []

    def sum(self, values, what):
        self.sizes.append(values.numel())
        return values.double() * 2

    def collective(self, what):
        return contextlib.nullcontext()


def bench_config(*argv: str):
    """The ``BenchConfig`` that ``forwardgrad bench`` builds from these flags."""
    from forwardgrad import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.config_from_args(parser.parse_args(list(argv)))
