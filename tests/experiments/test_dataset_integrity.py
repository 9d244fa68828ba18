"""Fashion-MNIST is checked by the SHA-256 of its decompressed files like MNIST; a directory where
a data file should be is named, and a failed download leaves no empty folder in the cache."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request

import numpy as np
import pytest
from helpers import write_idx

from forwardgrad.experiments.datasets import DATASETS, FILES, DataError, load_dataset

# The SHA-256 of the published Fashion-MNIST files once decompressed.
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every download fails at once, and no real cache is touched."""

    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    monkeypatch.delenv("FORWARDGRAD_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def test_fashion_mnist_is_pinned_by_its_decompressed_hashes():
    assert DATASETS["fashion-mnist"].sha256 == FASHION_SHA256


def _well_formed_copy(directory) -> None:
    """Files of Fashion-MNIST's structure (60,000 + 10,000 examples) but not its content."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 60_000), ("t10k", 10_000)):
        write_idx(directory / f"{split}-images-idx3-ubyte", np.zeros((count, 28, 28), np.uint8))
        labels = rng.integers(0, 10, count)
        write_idx(directory / f"{split}-labels-idx1-ubyte", labels)


def test_a_well_formed_copy_with_other_content_is_refused(tmp_path):
    _well_formed_copy(tmp_path / "fashion-mnist")
    with pytest.raises(DataError, match="SHA-256 .* after decompression but fashion-mnist's"):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_a_directory_in_place_of_a_data_file_is_named(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"  # where torchvision keeps it
    raw.mkdir(parents=True)
    for file in FILES[1:]:
        (raw / f"{file}.gz").write_bytes(gzip.compress(b"x"))
    (raw / FILES[0]).mkdir()
    with pytest.raises(DataError, match=f"{FILES[0]} is a directory where a data file should be"):
        load_dataset("fashion-mnist", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FashionMNIST"]


def test_a_failed_download_leaves_no_empty_folder_in_the_cache(tmp_path):
    with pytest.raises(DataError, match="downloading failed"):
        load_dataset("kmnist")
    assert not (tmp_path / "xdg-cache").exists()
