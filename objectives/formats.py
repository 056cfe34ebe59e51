"""Readers for datasets' standard distribution files, without torchvision.

Each reader checks what it reads and raises DataError saying which file is wrong and how.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

# IDX element types (the third byte of the magic number) and their numpy dtypes.
IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """The data cannot be used as given; the message says what is wrong and what to do."""


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not, as an array of its declared shape."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path} cannot be read ({error}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); download it again")
    dtype = IDX_TYPES[raw[2]]
    dimensions = raw[3]
    header = 4 + 4 * dimensions
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; download it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} bytes of data, but its header declares "
            f"shape {shape} ({expected} bytes): the file is truncated or damaged; download it "
            "again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
