"""Data sets on tiny IDX files written here; no test reads shared data or touches the network."""

import gzip
import hashlib
import io
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from forwardgrad.experiments import datasets as data
from forwardgrad.experiments.datasets import (
    DATASETS,
    FILES,
    DataError,
    DatasetSpec,
    default_data_dir,
    load_dataset,
)
from forwardgrad.experiments.idx import read_idx

MIRRORS = ("https://mirror-a.invalid/tiny/", "https://mirror-b.invalid/tiny/")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any download a test does not fake fails the test, and no real cache is touched."""

    def refuse(url, *args, **kwargs):
        raise AssertionError(f"test tried to reach the network: {url}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.delenv("FORWARDGRAD_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def tiny_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([2, 1, 0, 1], dtype=np.uint8),
    }


TINY = {file: idx_bytes(array) for file, array in tiny_arrays().items()}


def tiny_spec(hashes: bool = True, **changes) -> DatasetSpec:
    fields = dict(
        name="tiny",
        mirrors=MIRRORS,
        sha256={f: hashlib.sha256(b).hexdigest() for f, b in TINY.items()} if hashes else None,
        gz_md5=None,
        train_size=6,
        test_size=4,
        num_classes=3,
        torchvision_name="TINY",
    )
    return DatasetSpec(**{**fields, **changes})


@pytest.fixture
def tiny(monkeypatch):
    """Register a tiny data set (with hashes); returns a function to replace its spec."""

    def register(spec: DatasetSpec) -> DatasetSpec:
        monkeypatch.setitem(DATASETS, spec.name, spec)
        return spec

    return register


def write_files(directory: Path, files: dict[str, bytes] = TINY, gz: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for file, content in files.items():
        if gz:
            (directory / f"{file}.gz").write_bytes(gzip.compress(content))
        else:
            (directory / file).write_bytes(content)


def assert_tiny(dataset) -> None:
    arrays = tiny_arrays()
    assert dataset.train_images.dtype == torch.uint8 and dataset.train_images.shape == (6, 28, 28)
    assert dataset.train_labels.dtype == torch.int64 and dataset.train_labels.shape == (6,)
    assert np.array_equal(dataset.train_images.numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(dataset.train_labels.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(dataset.test_images.numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(dataset.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert dataset.num_classes == 3 and dataset.name == "tiny"


# --------------------------------------------------------------------------- specs


def test_builtin_specs():
    assert set(DATASETS) == {"mnist", "fashion-mnist", "kmnist"}
    for spec in DATASETS.values():
        assert (spec.train_size, spec.test_size, spec.num_classes) == (60_000, 10_000, 10)
        assert spec.mirrors and all(m.startswith("http") and m.endswith("/") for m in spec.mirrors)
        assert spec.sha256 is not None or spec.gz_md5 is not None
        for table in (spec.sha256, spec.gz_md5):
            assert table is None or set(table) == set(FILES)
    assert DATASETS["mnist"].sha256["train-images-idx3-ubyte"].startswith("ba891046")
    assert len(DATASETS["mnist"].mirrors) >= 2


# --------------------------------------------------------------------------- IDX reading


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32),
        np.array([0.5, -1.25], dtype=np.float32),
        np.array([-3, 3], dtype=np.int16),
    ],
    ids=["uint8", "int32", "float32", "int16"],
)
def test_read_idx(tmp_path, array, gz):
    path = tmp_path / ("file.gz" if gz else "file")
    content = idx_bytes(array)
    path.write_bytes(gzip.compress(content) if gz else content)
    tensor = read_idx(path)
    assert tuple(tensor.shape) == array.shape
    assert np.array_equal(tensor.numpy(), array)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "not an IDX file"),
        (b"\x00\x00\x08", "not an IDX file"),
        (b"PK\x03\x04" + bytes(100), "not an IDX file"),  # a zip file
        (b"\x00\x00\x07\x01" + bytes(8), "not an IDX file"),  # unknown type code
        (b"\x00\x00\x08\x03\x00\x00", "truncated or empty IDX header"),
        (b"\x00\x00\x08\x00", "truncated or empty IDX header"),
        (idx_bytes(np.zeros((2, 3), np.uint8))[:-1], "truncated or corrupt"),
        (idx_bytes(np.zeros((2, 3), np.uint8)) + b"\x00", "truncated or corrupt"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, content, match):
    path = tmp_path / "file"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_idx(path)


def test_read_idx_rejects_corrupt_and_truncated_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.zeros((5, 5), np.uint8)))
    for content in (good[: len(good) // 2], b"not gzip at all", good[:-4] + b"\xff\xff\xff\xff"):
        path = tmp_path / "file.gz"
        path.write_bytes(content)
        with pytest.raises(DataError, match="not a valid gzip file or is truncated"):
            read_idx(path)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("gz", [False, True])
def test_load_verifies_and_loads_raw_or_gz(tmp_path, tiny, gz):
    tiny(tiny_spec())
    write_files(tmp_path / "tiny", gz=gz)
    dataset = load_dataset("tiny", data_dir=tmp_path, download=False)
    assert_tiny(dataset)
    assert dataset.directory == tmp_path / "tiny"


def test_any_gzip_of_the_right_bytes_passes(tmp_path, tiny):
    tiny(tiny_spec())
    directory = tmp_path / "tiny"
    write_files(directory, {f: b for f, b in TINY.items() if "images" in f}, gz=False)
    for file in FILES[1::2]:  # labels: gzip at another level, with another mtime and file name
        with gzip.GzipFile(directory / f"{file}.gz", "wb", compresslevel=1, mtime=123) as out:
            out.write(TINY[file])
    assert_tiny(load_dataset("tiny", data_dir=tmp_path, download=True))


@pytest.mark.parametrize("where", ["tiny", "TINY/raw", "."])
def test_files_are_found_where_users_put_them(tmp_path, tiny, where):
    tiny(tiny_spec())
    write_files(tmp_path / where)
    dataset = load_dataset("tiny", data_dir=tmp_path, download=False)
    assert_tiny(dataset)
    assert dataset.directory == tmp_path / where


def test_the_named_folder_wins_over_the_base(tmp_path, tiny):
    tiny(tiny_spec(hashes=False))
    write_files(tmp_path / "tiny")
    swapped = dict(TINY)
    swapped["train-labels-idx1-ubyte"] = idx_bytes(np.array([2, 2, 2, 2, 2, 2], np.uint8))
    write_files(tmp_path, swapped)
    assert_tiny(load_dataset("tiny", data_dir=tmp_path, download=False))


def test_data_dir_resolution(tmp_path, monkeypatch, tiny):
    tiny(tiny_spec())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_dir() == tmp_path / "home" / ".cache" / "forwardgrad"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "forwardgrad"
    monkeypatch.setenv("FORWARDGRAD_DATA_DIR", str(tmp_path / "env"))
    assert default_data_dir() == tmp_path / "env"

    write_files(tmp_path / "env" / "tiny")
    assert load_dataset("tiny", download=False).directory == tmp_path / "env" / "tiny"
    write_files(tmp_path / "explicit" / "tiny")
    dataset = load_dataset("tiny", data_dir=tmp_path / "explicit", download=False)
    assert dataset.directory == tmp_path / "explicit" / "tiny"


def test_unknown_data_set():
    with pytest.raises(DataError, match="unknown data set 'cifar'; choose one of mnist, "):
        load_dataset("cifar")


def test_offline_error_names_the_files_and_the_folder(tmp_path, tiny):
    tiny(tiny_spec())
    with pytest.raises(DataError) as error:
        load_dataset("tiny", data_dir=tmp_path, download=False)
    message = str(error.value)
    assert all(file in message for file in FILES)
    assert str(tmp_path / "tiny") in message and "download=False" in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    assert isinstance(error.value, ValueError)
    assert not (tmp_path / "tiny").exists()


def test_offline_error_when_only_some_files_are_there(tmp_path, tiny):
    tiny(tiny_spec())
    write_files(tmp_path / "tiny", {f: TINY[f] for f in FILES[:3]})
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("tiny", data_dir=tmp_path, download=False)


def test_wrong_hash(tmp_path, tiny):
    tiny(tiny_spec())
    files = dict(TINY)
    images = bytearray(files["t10k-images-idx3-ubyte"])
    images[100] ^= 1  # one flipped bit, structure intact
    files["t10k-images-idx3-ubyte"] = bytes(images)
    write_files(tmp_path / "tiny", files)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz has SHA-256 .* replace it"):
        load_dataset("tiny", data_dir=tmp_path)
    assert (tmp_path / "tiny" / "t10k-images-idx3-ubyte.gz").exists()  # user files stay


def test_file_of_another_data_set_is_named(tmp_path, tiny):
    tiny(tiny_spec(name="tiny-known"))
    tiny(tiny_spec(name="tiny", hashes=False))
    write_files(tmp_path / "tiny")
    with pytest.raises(DataError, match="is a file of tiny-known, not of tiny"):
        load_dataset("tiny", data_dir=tmp_path)


@pytest.mark.parametrize("hashes", [True, False])
@pytest.mark.parametrize(
    "file, content, match",
    [
        ("train-images-idx3-ubyte", b"\x00\x00\x08", "not an IDX file"),
        ("train-labels-idx1-ubyte", b"\x08\x01\x00\x00" + bytes(10), "not an IDX file"),
        ("t10k-images-idx3-ubyte", TINY["t10k-images-idx3-ubyte"][:-10], "truncated or corrupt"),
    ],
)
def test_corrupt_file(tmp_path, tiny, hashes, file, content, match):
    # with hashes the hash check fails first; without, the structure check catches it
    tiny(tiny_spec(hashes=hashes))
    write_files(tmp_path / "tiny", {**TINY, file: content})
    with pytest.raises(DataError, match=match if not hashes else "SHA-256"):
        load_dataset("tiny", data_dir=tmp_path, download=False)


def test_truncated_gzip_file(tmp_path, tiny):
    tiny(tiny_spec())
    write_files(tmp_path / "tiny")
    path = tmp_path / "tiny" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is not a valid gzip file"):
        load_dataset("tiny", data_dir=tmp_path)


@pytest.mark.parametrize(
    "file, array, match",
    [
        ("train-images-idx3-ubyte", np.zeros((6, 27, 28), np.uint8), r"shape \(6, 27, 28\)"),
        ("train-images-idx3-ubyte", np.zeros((6, 28, 28), np.int32), "torch.int32 data"),
        ("train-labels-idx1-ubyte", np.zeros((6, 1), np.uint8), r"shape \(6, 1\)"),
        ("t10k-labels-idx1-ubyte", np.array([0, 1, 3, 2], np.uint8), "label 3 but tiny has only 3"),
    ],
)
def test_structure_is_checked_without_hashes(tmp_path, tiny, file, array, match):
    tiny(tiny_spec(hashes=False))
    write_files(tmp_path / "tiny", {**TINY, file: idx_bytes(array)})
    with pytest.raises(DataError, match=match):
        load_dataset("tiny", data_dir=tmp_path, download=False)


def test_image_and_label_counts_that_disagree(tmp_path, tiny):
    tiny(tiny_spec(hashes=False))
    labels = idx_bytes(np.array([0, 1, 2, 0, 1], np.uint8))
    write_files(tmp_path / "tiny", {**TINY, "train-labels-idx1-ubyte": labels})
    with pytest.raises(DataError, match="holds 6 train images but 5 train labels"):
        load_dataset("tiny", data_dir=tmp_path, download=False)


def test_counts_must_match_the_spec(tmp_path, tiny):
    tiny(tiny_spec(hashes=False, test_size=5))
    write_files(tmp_path / "tiny")
    with pytest.raises(DataError, match="holds 4 t10k examples but tiny has 5"):
        load_dataset("tiny", data_dir=tmp_path, download=False)


# --------------------------------------------------------------------------- downloading


class FakeResponse(io.BytesIO):
    """A response whose stream breaks after ``fail_after`` bytes, when given."""

    def __init__(self, content: bytes, fail_after: int | None = None):
        super().__init__(content)
        self.fail_after = fail_after

    def read(self, size=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        if self.fail_after is not None:
            size = self.fail_after - self.tell()
        return super().read(size)


def serve(monkeypatch, routes: dict[str, object]) -> list[str]:
    """Fake urlopen: routes map URLs to bytes, a FakeResponse, or an exception to raise."""
    requested = []

    def urlopen(url, timeout=None):
        requested.append(url)
        answer = routes.get(url, urllib.error.HTTPError(url, 404, "Not Found", {}, None))
        if isinstance(answer, Exception):
            raise answer
        return answer if isinstance(answer, FakeResponse) else FakeResponse(answer)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requested


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_falls_back_to_the_next_mirror_and_moves_files_into_the_cache(
    tmp_path, tiny, monkeypatch
):
    served = {f: gzip.compress(b) for f, b in TINY.items()}
    tiny(tiny_spec(gz_md5={f: hashlib.md5(b).hexdigest() for f, b in served.items()}))
    routes = {f"{MIRRORS[1]}{f}.gz": b for f, b in served.items()}
    routes[f"{MIRRORS[0]}train-images-idx3-ubyte.gz"] = urllib.error.URLError("unreachable")
    requested = serve(monkeypatch, routes)

    dataset = load_dataset("tiny")  # into the per-user cache
    assert_tiny(dataset)
    cache = tmp_path / "xdg-cache" / "forwardgrad" / "tiny"
    assert dataset.directory == cache
    assert leftovers(cache) == sorted(f"{f}.gz" for f in FILES)  # no temporary files
    assert requested[:2] == [f"{m}train-images-idx3-ubyte.gz" for m in MIRRORS]

    # a second load finds the files and does not download again
    assert_tiny(load_dataset("tiny"))
    assert len(requested) == 2 * len(FILES)


def test_download_only_fetches_missing_files(tmp_path, tiny, monkeypatch):
    tiny(tiny_spec())
    write_files(tmp_path / "tiny", {f: TINY[f] for f in FILES[:3]})
    requested = serve(monkeypatch, {f"{MIRRORS[0]}{FILES[3]}.gz": gzip.compress(TINY[FILES[3]])})
    assert_tiny(load_dataset("tiny", data_dir=tmp_path))
    assert requested == [f"{MIRRORS[0]}{FILES[3]}.gz"]


@pytest.mark.parametrize(
    "answer",
    [
        FakeResponse(gzip.compress(TINY[FILES[0]]), fail_after=1000),  # connection drops
        gzip.compress(TINY[FILES[0]])[:1000],  # truncated download
        gzip.compress(TINY[FILES[1]]),  # the wrong file
        urllib.error.URLError("name resolution failed"),  # offline
        TimeoutError("timed out"),
    ],
    ids=["reset", "truncated", "wrong-file", "offline", "timeout"],
)
def test_failed_download_leaves_nothing_and_says_where_to_put_the_files(
    tmp_path, tiny, monkeypatch, answer
):
    tiny(tiny_spec())
    if isinstance(answer, FakeResponse):  # one fresh stream per mirror
        routes = {f"{m}{FILES[0]}.gz": FakeResponse(answer.getvalue(), 1000) for m in MIRRORS}
    else:
        routes = {f"{m}{FILES[0]}.gz": answer for m in MIRRORS}
    serve(monkeypatch, routes)
    with pytest.raises(DataError) as error:
        load_dataset("tiny", data_dir=tmp_path)
    message = str(error.value)
    assert "downloading failed" in message and all(f in message for f in FILES)
    assert str(tmp_path / "tiny") in message and all(m in message for m in MIRRORS)
    assert leftovers(tmp_path / "tiny") == []


def test_download_checks_the_published_gz_md5(tmp_path, tiny, monkeypatch):
    tiny(tiny_spec(hashes=False, gz_md5={f: "0" * 32 for f in FILES}))
    serve(monkeypatch, {f"{m}{f}.gz": gzip.compress(b) for m in MIRRORS for f, b in TINY.items()})
    with pytest.raises(DataError, match="has MD5 .*, expected 0000"):
        load_dataset("tiny", data_dir=tmp_path)
    assert leftovers(tmp_path / "tiny") == []


def test_failure_mid_way_keeps_the_verified_files_only(tmp_path, tiny, monkeypatch):
    tiny(tiny_spec())
    routes = {f"{MIRRORS[0]}{f}.gz": gzip.compress(b) for f, b in TINY.items()}
    routes[f"{MIRRORS[0]}{FILES[2]}.gz"] = FakeResponse(gzip.compress(TINY[FILES[2]]), 500)
    serve(monkeypatch, routes)
    with pytest.raises(DataError, match="connection reset"):
        load_dataset("tiny", data_dir=tmp_path)
    assert leftovers(tmp_path / "tiny") == sorted(f"{f}.gz" for f in FILES[:2])

    # the next attempt fetches what is missing and loads everything
    serve(monkeypatch, {f"{MIRRORS[1]}{f}.gz": gzip.compress(b) for f, b in TINY.items()})
    assert_tiny(load_dataset("tiny", data_dir=tmp_path))


def test_existing_files_never_trigger_a_download(tmp_path, tiny):
    tiny(tiny_spec())
    write_files(tmp_path / "tiny")
    assert_tiny(load_dataset("tiny", data_dir=tmp_path, download=True))  # urlopen would raise


def test_downloads_use_the_module_timeout(tmp_path, tiny, monkeypatch):
    tiny(tiny_spec())
    seen = []

    def urlopen(url, timeout=None):
        seen.append(timeout)
        return FakeResponse(gzip.compress(TINY[url.rsplit("/", 1)[1][:-3]]))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    load_dataset("tiny", data_dir=tmp_path)
    assert seen == [data.DOWNLOAD_TIMEOUT_S] * 4
