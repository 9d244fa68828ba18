"""The IDX file format of MNIST and its relatives: a magic number, big-endian sizes, the data.

http://yann.lecun.com/exdb/mnist/ ("THE IDX FILE FORMAT"); files may be raw or gzip-compressed.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from forwardgrad.errors import DataError

# IDX type codes: http://yann.lecun.com/exdb/mnist/ ("THE IDX FILE FORMAT"), big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when its name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a valid gzip file or is truncated ({e}).") from e


def parse_idx(data: bytes, source: Path | str) -> torch.Tensor:
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
    return parse_idx(read_bytes(path), path)
