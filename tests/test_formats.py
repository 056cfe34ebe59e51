"""Standard dataset files, written by the test in their published format, read back."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from compsearch.objectives.formats import DataError, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic (0, 0, 0x08, ndim), big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compressed", [True, False])
def test_idx_images_and_labels_read_back_exactly(tmp_path, compressed):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(7,), dtype=np.uint8)
    for name, array in (("images", images), ("labels", labels)):
        data = idx_bytes(array)
        path = tmp_path / (f"{name}.gz" if compressed else name)
        path.write_bytes(gzip.compress(data) if compressed else data)
        np.testing.assert_array_equal(read_idx(path), array)


def test_the_real_mnist_files_when_present():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "raw"
    if not folder.is_dir():
        pytest.skip("../shared/data is not present")
    images = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "bad magic number"),
        (b"\x00\x00\x08", "bad magic number"),
        (b"PK\x03\x04whatever", "bad magic number"),
        (bytes([0, 0, 0x08, 3, 0, 0, 0, 2]), "truncated inside its header"),
        (idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-5], "the file is truncated or damaged"),
        (idx_bytes(np.zeros((3, 4, 4), np.uint8)) + b"\x00", "the file is truncated or damaged"),
    ],
)
def test_damaged_idx_files_say_what_is_wrong(tmp_path, content, fragment):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=fragment):
        read_idx(path)


def test_a_truncated_gzip_and_a_missing_file(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 4, 4), np.uint8)))[:-10])
    with pytest.raises(DataError, match="cannot be read"):
        read_idx(path)
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "absent.gz")
