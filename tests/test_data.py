"""Datasets read from their standard files: MNIST-format IDX files written by the test."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from test_formats import idx_bytes

from compsearch.objectives.data import DataError, load_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_mnist(folder: Path, train: int = 60, test: int = 20, compress: bool = True) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(test, dtype=np.uint8) % 10,
    }
    for name, array in arrays.items():
        data = idx_bytes(array)
        (folder / (name + ".gz" if compress else name)).write_bytes(
            gzip.compress(data) if compress else data
        )


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_is_found_below_the_data_dir_and_split(tmp_path, compress):
    write_mnist(tmp_path / "mnist" / "raw", compress=compress)
    data = load_dataset("mnist", seed=0, data_dir=tmp_path)
    assert (data.channels, data.resolution, data.num_classes) == (1, 28, 10)
    assert len(data.train) + len(data.val) == 60 and len(data.test) == 20
    # Stratified: every class keeps its share of the validation split.
    assert np.bincount(data.val.labels.numpy(), minlength=10).tolist() == [1] * 10
    assert not data.flip


def test_fashion_mnist_is_told_apart_from_mnist_by_its_folder(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw")
    write_mnist(tmp_path / "FashionMNIST" / "raw", train=80)
    fashion = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert len(fashion.train) + len(fashion.val) == 80
    assert fashion.class_names[0] == "T-shirt/top" and fashion.flip
    assert len(load_dataset("mnist", data_dir=tmp_path).val) == 10  # the 60-image copy


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda f: None, "no mnist IDX files under"),
        (lambda f: (f / "t10k-labels-idx1-ubyte.gz").unlink(), "is missing"),
        (
            lambda f: (f / "train-labels-idx1-ubyte.gz").write_bytes(
                gzip.compress(idx_bytes(np.zeros(59, np.uint8)))
            ),
            "do not match",
        ),
        (
            lambda f: (f / "train-images-idx3-ubyte.gz").write_bytes(
                gzip.compress(idx_bytes(np.zeros((60, 28, 28), np.uint8))[:-100])
            ),
            "truncated or damaged",
        ),
        (
            lambda f: (f / "train-labels-idx1-ubyte.gz").write_bytes(
                gzip.compress(idx_bytes(np.zeros(60, np.uint8)))
            ),
            "1 class in its training split",
        ),
    ],
)
def test_bad_mnist_files_say_what_is_wrong(tmp_path, damage, fragment):
    folder = tmp_path / "raw"
    if fragment != "no mnist IDX files under":
        write_mnist(folder)
    damage(folder)
    with pytest.raises(DataError, match=fragment):
        load_dataset("mnist", data_dir=tmp_path)


def test_the_real_mnist_copy_when_present():
    if not (SHARED / "mnist").is_dir():
        pytest.skip("../shared/data is not present")
    data = load_dataset("mnist", seed=0, data_dir=SHARED)
    assert len(data.train) + len(data.val) == 60_000 and len(data.test) == 10_000
    assert abs(data.mean[0] - 0.1307) < 0.002  # MNIST's well-known mean
