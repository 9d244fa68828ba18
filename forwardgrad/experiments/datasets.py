"""Image classification data sets in IDX format (MNIST, Fashion-MNIST, KMNIST), seeded batching.

Files are the four IDX files torchvision keeps under ``<Name>/raw/``, each raw or gzip-compressed:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``. Where the canonical SHA-256 of a file's *decompressed* bytes is known
(MNIST) it is checked, so any correct copy passes whatever gzip wrote it; every file is also checked
for structure: magic number, dimensions, example count, file size and label range.

Where files are looked for (first match wins), with ``base`` the explicit ``data_dir``, else the
environment variable ``FORWARDGRAD_DATA_DIR``, else the per-user cache
``$XDG_CACHE_HOME/forwardgrad`` (``~/.cache/forwardgrad``): ``base/<name>/``, torchvision's
``base/<Name>/raw/``, and ``base`` itself. Missing files are downloaded into ``base/<name>/``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import math
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "FILES",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "ShuffledBatches",
    "default_data_dir",
    "load_dataset",
    "normalize",
    "pixel_stats",
    "read_idx",
    "split_validation",
]

log = logging.getLogger(__name__)

FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IMAGE_SIZE = 28
DOWNLOAD_TIMEOUT_S = 60.0


class DataError(ValueError):
    """A data set is missing, cannot be downloaded, or a file is corrupt."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a data set's four files must hold and where to download them.

    Attributes:
        name: the data set's name, also its folder under the data directory.
        mirrors: base URLs; ``mirror + file + ".gz"`` is tried in order.
        sha256: SHA-256 of each file's decompressed bytes, by file name; ``None`` where the
            canonical hashes are not known, in which case only the structure is checked.
        gz_md5: MD5 of each ``.gz`` file as the mirrors serve it (checked on download only, as
            published by torchvision); ``None`` to skip.
        train_size, test_size: number of examples in each split.
        num_classes: labels must lie in ``[0, num_classes)``.
        torchvision_name: folder torchvision uses, so ``<base>/<torchvision_name>/raw`` is found.
    """

    name: str
    mirrors: tuple[str, ...]
    sha256: Mapping[str, str] | None
    gz_md5: Mapping[str, str] | None
    train_size: int = 60_000
    test_size: int = 10_000
    num_classes: int = 10
    torchvision_name: str | None = None


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        sha256={
            "train-images-idx3-ubyte": (
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
            ),
            "train-labels-idx1-ubyte": (
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
            ),
            "t10k-images-idx3-ubyte": (
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
            ),
            "t10k-labels-idx1-ubyte": (
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
            ),
        },
        gz_md5=None,  # the decompressed hashes above already pin the content
        torchvision_name="MNIST",
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        sha256=None,  # canonical decompressed hashes not known here: structure is checked
        gz_md5={
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        torchvision_name="FashionMNIST",
    ),
    "kmnist": DatasetSpec(
        name="kmnist",
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        sha256=None,  # canonical decompressed hashes not known here: structure is checked
        gz_md5={
            "train-images-idx3-ubyte": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte": "7320c461ea6c1c855c0b718fb2a4b134",
        },
        torchvision_name="KMNIST",
    ),
}


@dataclass(frozen=True)
class Dataset:
    """A loaded data set: uint8 images ``(N, 28, 28)`` and int64 labels ``(N,)`` per split."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    directory: Path


# --------------------------------------------------------------------------- IDX files

# IDX type codes: http://yann.lecun.com/exdb/mnist/ ("THE IDX FILE FORMAT"), big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when its name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a valid gzip file or is truncated ({e}).") from e


def _parse_idx(data: bytes, source: Path | str) -> torch.Tensor:
    """Parse IDX bytes into a tensor of the file's shape (native byte order)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(
            f"{source} is not an IDX file: magic number {data[:4].hex() or '(empty)'} should be "
            "00 00 <type code> <number of dimensions>."
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{source} has a truncated or empty IDX header ({ndim} dimensions).")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{source} holds {len(data)} bytes but an IDX file of shape {shape} needs {expected}; "
            "it is truncated or corrupt."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read one IDX file, raw or ``.gz``, into a tensor of its stored shape and type.

    Raises:
        DataError: the file is not valid gzip, not IDX, or its size does not match its header.
    """
    path = Path(path)
    return _parse_idx(_read_bytes(path), path)


def _load_file(path: Path, spec: DatasetSpec, file: str) -> torch.Tensor:
    """Read, verify and parse one of a data set's four files."""
    data = _read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if spec.sha256 is not None and digest != spec.sha256[file]:
        raise DataError(
            f"{path} has SHA-256 {digest} after decompression but {spec.name}'s {file} has "
            f"{spec.sha256[file]}; the file is corrupt or from another data set, replace it."
        )
    for other in DATASETS.values():
        if other.name != spec.name and other.sha256 and digest in other.sha256.values():
            raise DataError(f"{path} is a file of {other.name}, not of {spec.name}.")

    tensor = _parse_idx(data, path)
    # example counts are checked by load_dataset, which sees images and labels together
    is_images = "images" in file
    want = f"(N, {IMAGE_SIZE}, {IMAGE_SIZE})" if is_images else "(N,)"
    shape_ok = tensor.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE) if is_images else tensor.dim() == 1
    if data[2] != 0x08 or not shape_ok:
        raise DataError(
            f"{path} holds {tensor.dtype} data of shape {tuple(tensor.shape)} but {spec.name}'s "
            f"{file} holds uint8 data of shape {want}."
        )
    if is_images:
        return tensor
    labels = tensor.long()
    if labels.numel() and int(labels.max()) >= spec.num_classes:
        raise DataError(
            f"{path} has label {int(labels.max())} but {spec.name} has only "
            f"{spec.num_classes} classes."
        )
    return labels


# --------------------------------------------------------------------------- locating, download


def default_data_dir() -> Path:
    """``FORWARDGRAD_DATA_DIR`` if set, else ``$XDG_CACHE_HOME/forwardgrad`` (``~/.cache/...``)."""
    if os.environ.get("FORWARDGRAD_DATA_DIR"):
        return Path(os.environ["FORWARDGRAD_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "forwardgrad"


def _find(directory: Path, file: str) -> Path | None:
    for candidate in (directory / file, directory / f"{file}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _candidate_dirs(base: Path, spec: DatasetSpec) -> list[Path]:
    dirs = [base / spec.name]
    if spec.torchvision_name:
        dirs.append(base / spec.torchvision_name / "raw")
    return [*dirs, base]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _download(spec: DatasetSpec, file: str, target: Path) -> torch.Tensor:
    """Download ``file.gz`` from the first mirror that serves a valid copy into ``target``; load it.

    The bytes go to a temporary file in ``target``, are fsynced and verified, and only then
    renamed (atomically) to their final name, so an interrupted or corrupt download leaves nothing.
    """
    target.mkdir(parents=True, exist_ok=True)
    final = target / f"{file}.gz"
    errors = []
    for mirror in spec.mirrors:
        url = f"{mirror}{file}.gz"
        # hidden, and named apart from the final file so that nothing ever finds it half-written
        fd, tmp_name = tempfile.mkstemp(dir=target, prefix=f".{file}.", suffix=".part.gz")
        tmp = Path(tmp_name)
        try:
            md5 = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out:
                log.info("downloading %s", url)
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                    while chunk := response.read(1 << 20):
                        md5.update(chunk)
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if spec.gz_md5 is not None and md5.hexdigest() != spec.gz_md5[file]:
                raise DataError(f"{url} has MD5 {md5.hexdigest()}, expected {spec.gz_md5[file]}")
            tensor = _load_file(tmp, spec, file)
            os.replace(tmp, final)
            _fsync_dir(target)
            return tensor
        except (OSError, http.client.HTTPException, DataError) as e:
            log.info("download of %s failed: %s", url, e)
            errors.append(f"{url}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError(_missing_message(spec, target, f"downloading failed ({'; '.join(errors)})"))


def _missing_message(spec: DatasetSpec, directory: Path, reason: str) -> str:
    return (
        f"{spec.name} data not found and {reason}: put {', '.join(FILES)} (each raw or .gz) "
        f"in {directory}, or point data_dir or FORWARDGRAD_DATA_DIR at the folder that holds them."
    )


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> Dataset:
    """Load a data set's train and test splits, downloading missing files unless told not to.

    Args:
        name: a key of ``DATASETS``: ``"mnist"``, ``"fashion-mnist"`` or ``"kmnist"``.
        data_dir: base directory (see the module docstring); default ``default_data_dir()``.
        download: whether missing files may be fetched from the spec's mirrors.

    Returns:
        A ``Dataset`` with uint8 images ``(N, 28, 28)`` and int64 labels ``(N,)``.

    Raises:
        DataError: files missing and not downloadable, or a file fails verification.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}.")
    spec = DATASETS[name]
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    directory = next(
        (d for d in _candidate_dirs(base, spec) if all(_find(d, f) for f in FILES)),
        base / spec.name,
    )
    if not download and not all(_find(directory, f) for f in FILES):
        raise DataError(_missing_message(spec, directory, "download=False forbids fetching it"))

    tensors = {}
    for file in FILES:
        path = _find(directory, file)
        if path is None:
            tensors[file] = _download(spec, file, directory)
        else:
            tensors[file] = _load_file(path, spec, file)

    for split, size in (("train", spec.train_size), ("t10k", spec.test_size)):
        n_images = len(tensors[f"{split}-images-idx3-ubyte"])
        n_labels = len(tensors[f"{split}-labels-idx1-ubyte"])
        if n_images != n_labels:
            raise DataError(
                f"{directory} holds {n_images} {split} images but {n_labels} {split} labels; "
                "one of the two files is from another data set or corrupt."
            )
        if n_images != size:
            raise DataError(
                f"{directory} holds {n_images} {split} examples but {spec.name} has {size}."
            )
    return Dataset(
        name=spec.name,
        train_images=tensors["train-images-idx3-ubyte"],
        train_labels=tensors["train-labels-idx1-ubyte"],
        test_images=tensors["t10k-images-idx3-ubyte"],
        test_labels=tensors["t10k-labels-idx1-ubyte"],
        num_classes=spec.num_classes,
        directory=directory,
    )


# --------------------------------------------------------------------------- preprocessing


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


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) into an unrelated 64-bit seed; the list always has two
    # entries, as SeedSequence ignores trailing zeros ([s] and [s, 0] give the same state).
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])


class ShuffledBatches:
    """Mini-batches of indices, reshuffled every epoch, reproducible and exactly resumable.

    Epoch ``e``'s order is ``torch.randperm(num_examples)`` from a ``torch.Generator`` seeded
    with a mix of ``(seed, e)``, so the same seed gives every estimator the same batches in the
    same order, and an epoch's order does not depend on how many batches came before it.

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
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
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
    ``seed``, go to validation. Both index tensors are sorted int64; index the train split with
    them, and give ``ShuffledBatches(len(train_idx), ...)`` batches ``train_idx[batch]``.
    """
    n_val = round(n * fraction)
    if not 0 < fraction < 1 or not 0 < n_val < n:
        raise ValueError(
            f"fraction {fraction} of {n} examples must leave at least one example on each side."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values
