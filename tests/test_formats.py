"""Standard dataset files, written by the test in their published format, read back."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest

from compsearch.objectives.errors import DataError
from compsearch.objectives.formats import (
    read_cifar_batch,
    read_idx,
    read_label_names,
    read_stl10_images,
    read_stl10_labels,
    read_svhn_mat,
)


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


# CIFAR, SVHN and STL-10 files, written in their published layouts.


def cifar_bytes(content: dict, protocol: int = 2) -> bytes:
    # Protocol 2 is what Python 2 wrote the official files with.
    return pickle.dumps(content, protocol=protocol)


def test_a_cifar_batch_reads_back_with_the_colour_planes_in_order(tmp_path):
    rows = np.zeros((3, 3072), np.uint8)
    # Image 1, green plane (the second 1024 values), row 2, column 5.
    rows[1, 1024 + 2 * 32 + 5] = 200
    path = tmp_path / "data_batch_1"
    path.write_bytes(cifar_bytes({"data": rows, "labels": [0, 9, 3], "batch_label": "x"}))
    images, labels = read_cifar_batch(path, "labels", 10)
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.uint8
    assert images[1, 1, 2, 5] == 200 and images.sum() == 200
    assert labels.tolist() == [0, 9, 3] and labels.dtype == np.int64


def test_a_pickle_written_with_bytes_keys_reads_too(tmp_path):
    path = tmp_path / "batches.meta"
    path.write_bytes(cifar_bytes({b"label_names": [b"cat", b"dog"]}))
    assert read_label_names(path, "label_names") == ("cat", "dog")


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Exploit(marker), "labels": []}))
    with pytest.raises(DataError, match="refers to (posix|os|nt).system"):
        read_cifar_batch(path, "labels", 10)
    assert not marker.exists()


def good_batch() -> bytes:
    return cifar_bytes({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]})


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (good_batch()[:-100], "truncated or damaged"),
        (b"", "truncated or damaged"),
        (b"not a pickle at all", "truncated or damaged"),
        (cifar_bytes([1, 2, 3]), "holds a list, not the dict"),
        (cifar_bytes({"labels": [0]}), "has no 'data' entry"),
        (cifar_bytes({"data": np.zeros((4, 3072), np.uint8)}), "has no 'labels' entry"),
        (
            cifar_bytes({"data": np.zeros((4, 1024), np.uint8), "labels": [0] * 4}),
            "images of 1024 values, expected 3072",
        ),
        (
            cifar_bytes({"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4}),
            "float32 array",
        ),
        (
            cifar_bytes({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3}),
            r"labels of shape \(3,\).*expected 4 whole numbers",
        ),
        (
            cifar_bytes({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}),
            r"labels from 0 to 10, outside 0\.\.9",
        ),
    ],
)
def test_damaged_cifar_files_say_what_is_wrong(tmp_path, content, fragment):
    path = tmp_path / "data_batch_3"
    path.write_bytes(content)
    with pytest.raises(DataError, match=fragment) as caught:
        read_cifar_batch(path, "labels", 10)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message


def test_svhn_reads_back_in_image_order_with_ten_meaning_zero(tmp_path):
    from scipy.io import savemat

    images = np.zeros((4, 3, 32, 32), np.uint8)  # (N, C, H, W)
    images[2, 0, 3, 7] = 250  # image 2, red, row 3, column 7
    path = tmp_path / "train_32x32.mat"
    # SVHN stores X as (H, W, C, N) and y as (N, 1) with 10 for the digit 0.
    savemat(path, {"X": images.transpose(2, 3, 1, 0), "y": np.array([[10], [1], [9], [10]])})
    read_images, labels = read_svhn_mat(path)
    np.testing.assert_array_equal(read_images, images)
    assert labels.tolist() == [0, 1, 9, 0]


@pytest.mark.parametrize(
    ("variables", "cut", "fragment"),
    [
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1))}, 300, "truncated"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8)}, 0, "has no 'y' variable"),
        ({"X": np.zeros((32, 32, 1, 2), np.uint8), "y": np.ones((2, 1))}, 0, "expected uint8"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))}, 0, "expected 2"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.full((2, 1), 11)}, 0, "0..10"),
    ],
)
def test_damaged_svhn_files_say_what_is_wrong(tmp_path, variables, cut, fragment):
    from scipy.io import savemat

    path = tmp_path / "test_32x32.mat"
    savemat(path, variables)
    if cut:
        path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(DataError, match=fragment):
        read_svhn_mat(path)
    with pytest.raises(DataError, match="does not exist"):
        read_svhn_mat(tmp_path / "absent.mat")


def stl10_bytes(images: np.ndarray) -> bytes:
    """STL-10's layout: per image, each colour plane written column by column."""
    return np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes()


def test_stl10_images_read_back_rows_first(tmp_path):
    images = np.zeros((2, 3, 96, 96), np.uint8)
    images[1, 2, 10, 80] = 123  # image 1, blue, row 10, column 80
    images[0, 0, 0, :] = 7  # image 0, red, the whole first row
    path = tmp_path / "train_X.bin"
    path.write_bytes(stl10_bytes(images))
    read = read_stl10_images(path)
    np.testing.assert_array_equal(read, images)
    labels = tmp_path / "train_y.bin"
    labels.write_bytes(bytes([1, 10]))
    assert read_stl10_labels(labels, 2).tolist() == [0, 9]


def test_damaged_stl10_files_say_what_is_wrong(tmp_path):
    path = tmp_path / "test_X.bin"
    path.write_bytes(stl10_bytes(np.zeros((2, 3, 96, 96), np.uint8))[:-1])
    with pytest.raises(DataError, match="not a whole number of 96x96"):
        read_stl10_images(path)
    labels = tmp_path / "test_y.bin"
    labels.write_bytes(bytes([1, 2, 3]))
    with pytest.raises(DataError, match="3 labels but its images file holds 2"):
        read_stl10_labels(labels, 2)
    labels.write_bytes(bytes([0, 2]))
    with pytest.raises(DataError, match="outside 1..10"):
        read_stl10_labels(labels, 2)
