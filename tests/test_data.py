"""Datasets read from their standard files, written by the test in their published
layouts: MNIST's IDX files, CIFAR's pickles, SVHN's MATLAB files and STL-10's binaries."""

from __future__ import annotations

import gzip
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_formats import idx_bytes, stl10_bytes

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


# CIFAR, SVHN and STL-10 from tiny copies written in their published layouts.

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def cifar_rows(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 3072), dtype=np.uint8)


def write_pickle(path: Path, content: dict) -> None:
    path.write_bytes(pickle.dumps(content, protocol=2))


def write_cifar10(folder: Path, per_batch: int = 20, test: int = 20) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for batch in range(1, 6):
        labels = [(i + batch) % 10 for i in range(per_batch)]
        write_pickle(
            folder / f"data_batch_{batch}", {"data": cifar_rows(per_batch, batch), "labels": labels}
        )
    write_pickle(
        folder / "test_batch",
        {"data": cifar_rows(test, 0), "labels": [i % 10 for i in range(test)]},
    )
    write_pickle(folder / "batches.meta", {"label_names": CIFAR10_NAMES, "num_vis": 3072})


def write_cifar100(folder: Path, train: int = 300, test: int = 100) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", train), ("test", test)):
        labels = [i % 100 for i in range(count)]
        write_pickle(
            folder / name,
            {"data": cifar_rows(count, count), "fine_labels": labels, "coarse_labels": [0] * count},
        )
    write_pickle(folder / "meta", {"fine_label_names": [f"class{n:02d}" for n in range(100)]})


def write_svhn(folder: Path, train: int = 40, test: int = 20) -> None:
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, count in (("train", train), ("test", test)):
        labels = np.arange(count) % 10 + 1  # 1..10, 10 standing for the digit 0
        images = rng.integers(0, 256, (32, 32, 3, count), dtype=np.uint8)
        savemat(folder / f"{name}_32x32.mat", {"X": images, "y": labels[:, None].astype(np.uint8)})


def write_stl10(folder: Path, train: int = 20, test: int = 10) -> np.ndarray:
    """Returns the test images, rows first, as the reader must give them back."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    kept = None
    for name, count in (("train", train), ("test", test)):
        images = rng.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)
        (folder / f"{name}_X.bin").write_bytes(stl10_bytes(images))
        (folder / f"{name}_y.bin").write_bytes(
            (np.arange(count) % 10 + 1).astype(np.uint8).tobytes()
        )
        kept = images
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return kept


def test_cifar10_is_found_below_the_data_dir_with_its_pixels_in_place(tmp_path):
    folder = tmp_path / "datasets" / "cifar-10-batches-py"
    write_cifar10(folder)
    for data_dir in (tmp_path, folder):
        data = load_dataset("cifar10", seed=0, data_dir=data_dir)
        assert (data.channels, data.resolution, data.num_classes) == (3, 32, 10)
        assert len(data.train) + len(data.val) == 100 and len(data.test) == 20
        assert data.class_names[0] == "airplane" and data.flip
    # The test split is the test_batch, in order: row r's green plane is image r's channel 1.
    rows = cifar_rows(20, 0)
    np.testing.assert_array_equal(
        data.test.images[3, 1].numpy(), rows[3, 1024:2048].reshape(32, 32)
    )
    assert data.test.labels.tolist() == [i % 10 for i in range(20)]


def test_cifar100_reads_the_fine_labels(tmp_path):
    write_cifar100(tmp_path / "cifar-100-python")
    data = load_dataset("cifar100", seed=0, data_dir=tmp_path)
    assert (data.channels, data.resolution, data.num_classes) == (3, 32, 100)
    assert len(data.train) + len(data.val) == 300 and len(data.test) == 100
    assert data.class_names[7] == "class07" and data.test.labels.max() == 99


def test_svhn_maps_ten_to_zero_and_does_not_flip(tmp_path):
    write_svhn(tmp_path / "svhn")
    data = load_dataset("svhn", seed=0, data_dir=tmp_path)
    assert (data.channels, data.resolution, data.num_classes) == (3, 32, 10)
    assert data.test.labels.tolist() == [(i + 1) % 10 for i in range(20)]
    assert not data.flip


def test_stl10_is_read_rows_first(tmp_path):
    test_images = write_stl10(tmp_path / "stl10_binary")
    data = load_dataset("stl10", seed=0, data_dir=tmp_path)
    assert (data.channels, data.resolution, data.num_classes) == (3, 96, 10)
    np.testing.assert_array_equal(data.test.images.numpy(), test_images)
    assert data.test.labels.tolist() == [i % 10 for i in range(10)]
    assert data.class_names[2] == "car" and data.flip


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda f: (f / "data_batch_4").unlink(), "lacks data_batch_4 of cifar10's files"),
        (
            lambda f: (f / "data_batch_2").write_bytes((f / "data_batch_2").read_bytes()[:999]),
            "data_batch_2 is truncated or damaged",
        ),
        (
            lambda f: write_pickle(f / "batches.meta", {"label_names": CIFAR10_NAMES[:9]}),
            "names 9 classes, but cifar10 has 10",
        ),
        (
            lambda f: write_pickle(
                f / "test_batch", {"data": cifar_rows(20, 0), "labels": [12] * 20}
            ),
            r"test_batch holds labels from 12 to 12, outside 0\.\.9",
        ),
        (
            lambda f: [
                write_pickle(f / f"data_batch_{b}", {"data": cifar_rows(20, b), "labels": [3] * 20})
                for b in range(1, 6)
            ],
            "1 class in its training split",
        ),
    ],
)
def test_bad_cifar_files_say_what_is_wrong(tmp_path, damage, fragment):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    damage(folder)
    with pytest.raises(DataError, match=fragment) as caught:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "\n" not in str(caught.value)


def test_bad_svhn_and_stl10_files_say_what_is_wrong(tmp_path):
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(DataError, match="lacks test_32x32.mat"):
        load_dataset("svhn", data_dir=tmp_path)
    folder = tmp_path / "stl10_binary"
    write_stl10(folder)
    (folder / "test_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(DataError, match="test_y.bin holds 3 labels but its images file holds 10"):
        load_dataset("stl10", data_dir=tmp_path)


@pytest.fixture
def no_torchvision(monkeypatch):
    # None in sys.modules makes `import torchvision` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.delitem(sys.modules, "torchvision.datasets", raising=False)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100", "svhn", "stl10"])
def test_missing_files_without_torchvision_say_where_and_how(tmp_path, no_torchvision, name):
    with pytest.raises(DataError) as caught:
        load_dataset(name, data_dir=tmp_path / "nowhere")
    message = str(caught.value)
    assert message.startswith(f"no {name} ") and str(tmp_path / "nowhere") in message
    assert "pip install compsearch[vision]" in message and "\n" not in message


def fake_torchvision(monkeypatch, datasets: types.ModuleType) -> None:
    package = types.ModuleType("torchvision")
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_missing_files_are_downloaded_with_torchvision_when_it_is_there(tmp_path, monkeypatch):
    calls = []

    class CIFAR10:  # what torchvision does: the archive unpacked into root
        def __init__(self, root, download, train):
            calls.append((root, download, train))
            write_cifar10(Path(root) / "cifar-10-batches-py")

    fake_torchvision(monkeypatch, types.SimpleNamespace(CIFAR10=CIFAR10))
    data = load_dataset("cifar10", data_dir=tmp_path / "data")
    assert calls == [(str(tmp_path / "data"), True, True)]
    assert len(data.test) == 20
    load_dataset("cifar10", data_dir=tmp_path / "data")  # the files are there now
    assert len(calls) == 1


def test_a_failed_download_says_why(tmp_path, monkeypatch):
    class SVHN:
        def __init__(self, root, download, split):
            raise ConnectionError("Name or service not known\n(more detail)")

    fake_torchvision(monkeypatch, types.SimpleNamespace(SVHN=SVHN))
    with pytest.raises(DataError) as caught:
        load_dataset("svhn", data_dir=tmp_path)
    message = str(caught.value)
    assert message.startswith(f"no svhn files under {tmp_path}")
    assert "downloading them with torchvision failed (ConnectionError: Name or service not " in (
        message
    )
    assert "\n" not in message


def test_a_broken_torchvision_is_reported_not_raised(tmp_path, monkeypatch):
    package = tmp_path / "site" / "torchvision"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.delitem(sys.modules, "torchvision.datasets", raising=False)
    with pytest.raises(
        DataError, match="torchvision, which would download them, cannot be imported"
    ):
        load_dataset("stl10", data_dir=tmp_path / "data")


def test_an_unknown_name_lists_the_datasets():
    with pytest.raises(DataError, match="available: digits, mnist.*stl10, or folder:PATH"):
        load_dataset("imagenet")


def test_statistics_match_torch_exactly():
    from compsearch.objectives.data import channel_statistics

    images = torch.randint(0, 256, (50, 3, 5, 5), dtype=torch.uint8)
    mean, std = channel_statistics(images)
    scaled = images.double() / 255
    assert np.allclose(mean, scaled.mean(dim=(0, 2, 3)).tolist(), atol=1e-12)
    assert np.allclose(std, scaled.std(dim=(0, 2, 3)).tolist(), atol=1e-12)


@pytest.mark.slow
def test_the_real_cifar10_batches_built_from_the_shared_copy(tmp_path):
    script = SHARED / "cifar10-jpeg" / "make_batches.py"
    if not script.is_file():
        pytest.skip("../shared/data is not present")
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, capture_output=True)
    data = load_dataset("cifar10", seed=0, data_dir=tmp_path)
    assert len(data.train) + len(data.val) == 50_000 and len(data.test) == 10_000
    assert data.class_names == tuple(CIFAR10_NAMES)
    # The JPEG copy's per-channel means (../shared/data/README.md), on 40,000 of its images.
    assert np.allclose(data.mean, (0.4913, 0.4821, 0.4465), atol=0.002)
    official = np.loadtxt(SHARED / "cifar10-jpeg" / "test_labels.txt", dtype=np.int64)
    assert data.test.labels.tolist() == official.tolist()


def test_every_named_dataset_has_a_shape_and_a_reader():
    """A dataset is added in two places, catalog.SHAPES (known before loading, for the
    budget checks) and data.READERS; each must name the same datasets."""
    from compsearch.objectives.catalog import SHAPES
    from compsearch.objectives.data import READERS

    assert set(READERS) == set(SHAPES)
