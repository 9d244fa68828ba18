"""Image classification data sets in IDX format (MNIST, Fashion-MNIST, KMNIST): the registry
``DATASETS``, verification and download.

Files are the four IDX files torchvision keeps under ``<Name>/raw/``, each raw or gzip-compressed:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``. Where the canonical SHA-256 of a file's *decompressed* bytes is known
(MNIST, Fashion-MNIST) it is checked, so any correct copy passes whatever gzip wrote it; every file
is also checked for structure: magic number, dimensions, example count, file size and label range.
KMNIST's decompressed hashes are not known here: a download is checked against the MD5 its
publishers give for each ``.gz`` archive, but a copy already on disk only for its structure.

Where files are looked for (first match wins), with ``base`` the explicit ``data_dir``, else the
environment variable ``FORWARDGRAD_DATA_DIR``, else the per-user cache
``$XDG_CACHE_HOME/forwardgrad`` (``~/.cache/forwardgrad``): ``base/<name>/``, torchvision's
``base/<Name>/raw/``, and ``base`` itself. Missing files are downloaded into ``base/<name>/``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from forwardgrad.errors import DataError
from forwardgrad.experiments.files import atomic_file
from forwardgrad.experiments.idx import parse_idx, read_bytes

__all__ = [
    "DATASETS",
    "FILES",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "default_data_dir",
    "load_dataset",
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
        sha256={
            "train-images-idx3-ubyte": (
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
            ),
            "train-labels-idx1-ubyte": (
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
            ),
            "t10k-images-idx3-ubyte": (
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
            ),
            "t10k-labels-idx1-ubyte": (
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
            ),
        },
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
        # The decompressed hashes are not known here: downloads are checked by the published
        # MD5 of each archive, copies on disk only for their structure.
        sha256=None,
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


def _load_file(path: Path, spec: DatasetSpec, file: str) -> torch.Tensor:
    """Read, verify and parse one of a data set's four files."""
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if spec.sha256 is not None and digest != spec.sha256[file]:
        raise DataError(
            f"{path} has SHA-256 {digest} after decompression but {spec.name}'s {file} has "
            f"{spec.sha256[file]}; the file is corrupt or from another data set, replace it."
        )
    for other in DATASETS.values():
        if other.name != spec.name and other.sha256 and digest in other.sha256.values():
            raise DataError(f"{path} is a file of {other.name}, not of {spec.name}.")

    tensor = parse_idx(data, path)
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
        if candidate.is_dir():
            raise DataError(
                f"{candidate} is a directory where a data file should be; remove it, or put "
                "the file there."
            )
    return None


def _candidate_dirs(base: Path, spec: DatasetSpec) -> list[Path]:
    dirs = [base / spec.name]
    if spec.torchvision_name:
        dirs.append(base / spec.torchvision_name / "raw")
    return [*dirs, base]


def _download(spec: DatasetSpec, file: str, target: Path) -> torch.Tensor:
    """Download ``file.gz`` from the first mirror that serves a valid copy into ``target``; load it.

    The bytes go to a hidden temporary file in ``target`` (``files.atomic_file``) and are
    verified before it is renamed to its final name, so an interrupted or corrupt download
    leaves nothing that a later run could find.
    """
    created = [d for d in (target, *target.parents) if not d.exists()]
    target.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in spec.mirrors:
        url = f"{mirror}{file}.gz"
        try:
            return _fetch(url, spec, file, target / f"{file}.gz")
        except (OSError, http.client.HTTPException, DataError) as e:
            log.info("download of %s failed: %s", url, e)
            errors.append(f"{url}: {e}")
    for directory in created:  # deepest first; a failed download leaves no empty folder
        try:
            directory.rmdir()
        except OSError:
            break
    raise DataMissing(spec.name, target, offline=False, reason="; ".join(errors))


def _fetch(url: str, spec: DatasetSpec, file: str, final: Path) -> torch.Tensor:
    """Stream ``url`` into ``final`` (atomically), checking its MD5 and its content first."""
    md5 = hashlib.md5(usedforsecurity=False)
    with atomic_file(final) as out:
        log.info("downloading %s", url)
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            while chunk := response.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
        out.flush()
        if spec.gz_md5 is not None and md5.hexdigest() != spec.gz_md5[file]:
            raise DataError(f"{url} has MD5 {md5.hexdigest()}, expected {spec.gz_md5[file]}")
        return _load_file(Path(out.name), spec, file)


class DataMissing(DataError):
    """A data set's files are not where they were looked for and could not be downloaded.

    Attributes:
        name: the data set. directory: where they were looked for (and would be downloaded).
        offline: True when downloading was not allowed; else why downloading failed in
        ``reason``. The command line words the same facts with its own flags.
    """

    def __init__(self, name: str, directory: Path, offline: bool, reason: str = ""):
        self.name, self.directory, self.offline, self.reason = name, directory, offline, reason
        why = "download=False forbids fetching it" if offline else f"downloading failed ({reason})"
        super().__init__(
            f"{name} data not found and {why}: put {', '.join(FILES)} (each raw or .gz) in "
            f"{directory}, or point data_dir or FORWARDGRAD_DATA_DIR at the folder that holds them."
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
        raise DataMissing(spec.name, directory, offline=True)

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
