"""Datasets read from their standard files, held as whole uint8 tensors and split once."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from compsearch.objectives import formats
from compsearch.objectives.catalog import FOLDER_PREFIX, SHAPES
from compsearch.objectives.errors import DataError
from compsearch.objectives.folders import read_image_folder

if TYPE_CHECKING:
    import torch
    from rich.console import Console

DATASETS = tuple(SHAPES)
# digits and folders without a test/ folder have no official test split: a stratified 20%
# chosen once, with its own fixed seed, serves as one, so every study is tested alike.
TEST_FRACTION = 0.2
TEST_SEED = 20240101


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8, (N, C, H, W)
    labels: torch.Tensor  # int64, (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split  # what trials train on
    val: Split  # held out from the training data, stratified, fixed by the seed
    test: Split  # the official test split; only export touches it
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of train images scaled to [0, 1]
    std: tuple[float, ...]
    flip: bool  # whether a horizontal flip keeps the label (not for digits)

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def resolution(self) -> int:
        return self.train.images.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out), holding out `fraction` of every class."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        count = max(1, round(len(indices) * fraction))
        held.append(indices[:count])
        kept.append(indices[count:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))


@dataclass(frozen=True)
class Source:
    """A dataset as read from its files: official train and test splits, uint8 NCHW."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    flip: bool  # whether a horizontal flip keeps the label


def read_digits() -> Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; scale to the usual 0..255.
    images = np.clip(np.rint(digits.images * (255 / 16)), 0, 255).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    train, test = stratified_split(labels, TEST_FRACTION, seed=TEST_SEED)
    names = tuple(str(n) for n in range(10))
    return Source(images[train], labels[train], images[test], labels[test], names, False)


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def find_idx_folder(data_dir: Path, fashion: bool) -> Path | None:
    """The folder under `data_dir` (itself or up to three levels down) holding the IDX
    files. MNIST and Fashion-MNIST share file names; a path naming "fashion" tells them
    apart when both are present."""
    candidates: list[Path] = []
    for depth in range(4):
        pattern = "/".join(["*"] * depth + [IDX_FILES["train_images"] + "*"])
        candidates += sorted({path.parent for path in data_dir.glob(pattern)})
    matching = [
        c for c in candidates if ("fashion" in str(c.relative_to(data_dir)).lower()) == fashion
    ]
    if matching:
        return matching[0]
    return candidates[0] if len(candidates) == 1 else None


def read_mnist_like(name: str, data_dir: Path) -> Source:
    """MNIST or Fashion-MNIST from their IDX files, gzipped or not."""
    fashion = name == "fashion-mnist"
    folder = find_idx_folder(data_dir, fashion) if data_dir.is_dir() else None
    if folder is None:
        download(
            name,
            data_dir,
            f"no {name} IDX files under {data_dir} (looked for {IDX_FILES['train_images']}"
            "[.gz] up to three folders down)",
        )
        folder = find_idx_folder(data_dir, fashion) if data_dir.is_dir() else None
    if folder is None:
        raise DataError(
            f"no {name} IDX files under {data_dir} after downloading them; set --data-dir to "
            "the folder that holds them"
        )
    arrays = {}
    for key, stem in IDX_FILES.items():
        found = [folder / (stem + ext) for ext in (".gz", "") if (folder / (stem + ext)).exists()]
        if not found:
            raise DataError(f"{folder / stem}[.gz] is missing; {name} needs all four IDX files")
        arrays[key] = formats.read_idx(found[0])
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{name} {split} files in {folder} do not match: images of shape "
                f"{images.shape} and labels of shape {labels.shape}; expected (N, H, W) and (N,)"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{name} {split} labels in {folder} go up to {labels.max()}, not 9")
    names = FASHION_MNIST_CLASSES if fashion else tuple(str(n) for n in range(10))
    return Source(
        arrays["train_images"][:, None],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None],
        arrays["test_labels"].astype(np.int64),
        names,
        flip=fashion,
    )


@dataclass(frozen=True)
class Distribution:
    """Where a dataset's standard files live and how torchvision downloads them."""

    folder: str  # the folder the files come in ("" if none); preferred when several match
    files: tuple[str, ...]  # every file the reader needs
    markers: tuple[str, ...]  # files whose presence identifies the folder
    downloader: str  # torchvision.datasets class
    download_splits: tuple[dict[str, object], ...]  # keyword arguments, one call each


DISTRIBUTIONS = {
    # MNIST's files are found by find_idx_folder; only the download is described here.
    "mnist": Distribution("MNIST/raw", (), (), "MNIST", ({"train": True}, {"train": False})),
    "fashion-mnist": Distribution(
        "FashionMNIST/raw", (), (), "FashionMNIST", ({"train": True}, {"train": False})
    ),
    "cifar10": Distribution(
        "cifar-10-batches-py",
        tuple(f"data_batch_{n}" for n in range(1, 6)) + ("test_batch", "batches.meta"),
        ("data_batch_1",),
        "CIFAR10",
        ({"train": True},),  # one archive holds both splits
    ),
    "cifar100": Distribution(
        "cifar-100-python",
        ("train", "test", "meta"),
        ("train", "meta"),
        "CIFAR100",
        ({"train": True},),
    ),
    # SVHN's files come without a folder: torchvision keeps them in its root folder.
    "svhn": Distribution(
        "",
        ("train_32x32.mat", "test_32x32.mat"),
        ("train_32x32.mat",),
        "SVHN",
        ({"split": "train"}, {"split": "test"}),
    ),
    "stl10": Distribution(
        "stl10_binary",
        ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt"),
        ("train_X.bin",),
        "STL10",
        ({"split": "train"},),  # one archive holds every split
    ),
}


def find_folder(data_dir: Path, markers: tuple[str, ...], preferred: str) -> Path | None:
    """The folder holding every `markers` file: `data_dir` itself or one up to three levels
    down (hidden folders skipped); one named `preferred` first, then the shallowest."""
    found: list[Path] = []
    level = [data_dir]
    for depth in range(4):
        below: list[Path] = []
        for folder in level:
            if all((folder / marker).is_file() for marker in markers):
                found.append(folder)
            if depth == 3:
                continue
            try:
                with os.scandir(folder) as entries:
                    below += sorted(
                        Path(entry.path)
                        for entry in entries
                        if not entry.name.startswith(".") and entry.is_dir()
                    )
            except OSError:  # unreadable or absent: nothing below it
                continue
        level = below
    named = [folder for folder in found if folder.name == preferred]
    return (named or found or [None])[0]


def locate(name: str, data_dir: Path) -> Path:
    """The folder holding `name`'s standard files, downloaded first when absent and
    torchvision can; DataError naming what is missing otherwise."""
    distribution = DISTRIBUTIONS[name]
    folder = find_folder(data_dir, distribution.markers, distribution.folder)
    if folder is None:
        looked = " and ".join(distribution.markers)
        prefix = f"{distribution.folder}/" if distribution.folder else ""
        download(
            name,
            data_dir,
            f"no {name} files under {data_dir} (looked for {prefix}{looked} in it and up to "
            "three folders down)",
        )
        folder = find_folder(data_dir, distribution.markers, distribution.folder)
        if folder is None:
            raise DataError(
                f"torchvision downloaded {name} into {data_dir}, but no folder there holds "
                f"{looked}; put the files there by hand"
            )
    missing = [file for file in distribution.files if not (folder / file).is_file()]
    if missing:
        raise DataError(
            f"{folder} lacks {', '.join(missing)} of {name}'s files "
            f"({', '.join(distribution.files)}); download the dataset again"
        )
    return folder


def download(name: str, data_dir: Path, missing: str) -> None:
    """Download `name` into `data_dir` with torchvision, if installed; else DataError
    starting with `missing` and saying how to get the files."""
    distribution = DISTRIBUTIONS[name]
    try:
        from torchvision import datasets
    except ModuleNotFoundError as error:
        if error.name is not None and error.name.split(".")[0] != "torchvision":
            raise DataError(
                f"{missing}, and torchvision, which would download them, cannot be imported "
                f"({formats.one_line(error)}); repair torchvision or put the files there"
            ) from None
        raise DataError(
            f"{missing}; put the files there or point --data-dir at them "
            "(`pip install compsearch[vision]` downloads them automatically)"
        ) from None
    except Exception as error:  # a broken torchvision raises on import
        raise DataError(
            f"{missing}, and torchvision, which would download them, cannot be imported "
            f"({formats.one_line(error)}); repair torchvision or put the files there"
        ) from None
    try:
        downloader = getattr(datasets, distribution.downloader)
        for arguments in distribution.download_splits:
            downloader(root=str(data_dir), download=True, **arguments)
    except Exception as error:  # network, disk and archive errors alike
        raise DataError(
            f"{missing}, and downloading them with torchvision failed "
            f"({type(error).__name__}: {formats.one_line(error)}); check the network or put "
            "the files there by hand"
        ) from None


def check_names(names: tuple[str, ...], name: str, path: Path) -> tuple[str, ...]:
    expected = SHAPES[name].num_classes
    if len(names) != expected:
        raise DataError(
            f"{path} names {len(names)} classes, but {name} has {expected}; "
            "download the dataset again"
        )
    return names


def read_cifar(name: str, data_dir: Path) -> Source:
    """CIFAR-10 or CIFAR-100 from their "python version" pickles."""
    folder = locate(name, data_dir)
    if name == "cifar10":
        names = check_names(
            formats.read_label_names(folder / "batches.meta", "label_names"), name, folder
        )
        batches = [
            formats.read_cifar_batch(folder / f"data_batch_{n}", "labels", len(names))
            for n in range(1, 6)
        ]
        train_images = np.concatenate([images for images, _ in batches])
        train_labels = np.concatenate([labels for _, labels in batches])
        test_images, test_labels = formats.read_cifar_batch(
            folder / "test_batch", "labels", len(names)
        )
    else:
        names = check_names(
            formats.read_label_names(folder / "meta", "fine_label_names"), name, folder
        )
        train_images, train_labels = formats.read_cifar_batch(
            folder / "train", "fine_labels", len(names)
        )
        test_images, test_labels = formats.read_cifar_batch(
            folder / "test", "fine_labels", len(names)
        )
    return Source(train_images, train_labels, test_images, test_labels, names, flip=True)


def read_svhn(data_dir: Path) -> Source:
    """SVHN's cropped digits (train and test; the "extra" images are not used)."""
    folder = locate("svhn", data_dir)
    train_images, train_labels = formats.read_svhn_mat(folder / "train_32x32.mat")
    test_images, test_labels = formats.read_svhn_mat(folder / "test_32x32.mat")
    names = tuple(str(n) for n in range(10))
    return Source(train_images, train_labels, test_images, test_labels, names, flip=False)


def read_stl10(data_dir: Path) -> Source:
    """STL-10's labelled splits from its binary files (the unlabelled images are not used)."""
    folder = locate("stl10", data_dir)
    names = check_names(formats.read_names(folder / "class_names.txt"), "stl10", folder)
    arrays = []
    for split in ("train", "test"):
        images = formats.read_stl10_images(folder / f"{split}_X.bin")
        arrays += [images, formats.read_stl10_labels(folder / f"{split}_y.bin", len(images))]
    return Source(*arrays, names, flip=True)


def read_folder(name: str, console: Console | None, cache_folder: Path | None) -> Source:
    """The user's images under `name`'s PATH; without a test/ folder, a fixed stratified
    20% of them is the test split. Decoded images are cached in `cache_folder`."""
    path = name[len(FOLDER_PREFIX) :]
    if not path:
        raise DataError("folder: needs a path, as in folder:photos (one sub-folder per class)")
    found = read_image_folder(Path(path).expanduser(), console, cache_folder)
    if found.has_test:
        # test/ images come after the train/ ones: slices, not copies.
        first_test = int(np.argmax(found.test)) if found.test.any() else len(found.test)
        train, test = slice(0, first_test), slice(first_test, None)
    else:
        train, test = stratified_split(found.labels, TEST_FRACTION, seed=TEST_SEED)
    return Source(
        found.images[train],
        found.labels[train],
        found.images[test],
        found.labels[test],
        found.class_names,
        # Taken to be photographs, whose mirror images keep their class.
        flip=True,
    )


# How each named dataset is read from --data-dir; its shape is in catalog.SHAPES.
READERS: dict[str, Callable[[Path], Source]] = {
    "digits": lambda data_dir: read_digits(),
    "mnist": lambda data_dir: read_mnist_like("mnist", data_dir),
    "fashion-mnist": lambda data_dir: read_mnist_like("fashion-mnist", data_dir),
    "cifar10": lambda data_dir: read_cifar("cifar10", data_dir),
    "cifar100": lambda data_dir: read_cifar("cifar100", data_dir),
    "svhn": read_svhn,
    "stl10": read_stl10,
}


def read_source(
    name: str, data_dir: Path, console: Console | None, cache_folder: Path | None = None
) -> Source:
    if name in READERS:
        return READERS[name](data_dir)
    if name.startswith(FOLDER_PREFIX):
        return read_folder(name, console, cache_folder)
    raise DataError(
        f"unknown dataset {name!r}; available: {', '.join(DATASETS)}, or folder:PATH for "
        "a folder of images with one sub-folder per class"
    )


def channel_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images scaled to [0, 1], exactly,
    from a histogram of each channel: a float copy of a whole dataset can take gigabytes
    and seconds."""
    import torch

    counts = torch.stack(
        [
            torch.bincount(images[:, channel].reshape(-1), minlength=256)
            for channel in range(images.shape[1])
        ]
    ).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255
    count = counts.sum(dim=1)
    mean = counts @ values / count.clamp_min(1)
    # Unbiased, as torch.std is by default.
    variance = (counts @ values.square() - count * mean.square()) / (count - 1).clamp_min(1)
    std = variance.clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def load_dataset(
    name: str = "digits",
    seed: int = 0,
    val_fraction: float = 0.2,
    subset: int | None = None,
    data_dir: Path = Path("data"),
    *,
    console: Console | None = None,
    cache_folder: Path | None = None,
) -> Dataset:
    """The dataset split into train, validation (stratified, fixed by `seed`) and test.
    `console` shows the progress of decoding a folder: of images (default: stderr), and
    `cache_folder` is where the decoded images are cached (default: the user's cache)."""
    source = read_source(name, Path(data_dir), console, cache_folder)
    labels = source.train_labels
    present = np.unique(labels)
    if len(present) < 2:
        raise DataError(f"{name} has {len(present)} class in its training split; it needs two")
    shape = SHAPES.get(name)
    found = (source.train_images.shape[1], source.train_images.shape[-1], len(source.class_names))
    if shape is not None and found != (shape.channels, shape.resolution, shape.num_classes):
        # The search space was built from SHAPES before loading: the files must agree.
        raise DataError(
            f"{name} in {data_dir} has {found[0]} channels, {found[1]} pixels and {found[2]} "
            f"classes, but {name} has {shape.channels}, {shape.resolution} and "
            f"{shape.num_classes}; download the dataset again"
        )
    fit_index, val_index = stratified_split(labels, val_fraction, seed)
    if subset is not None:
        if subset < len(source.class_names):
            raise DataError(
                f"--subset {subset} is smaller than the {len(source.class_names)} classes; "
                "give at least one image per class"
            )
        if subset < len(fit_index):
            keep, _ = stratified_split(labels[fit_index], 1 - subset / len(fit_index), seed)
            fit_index = fit_index[keep]

    # Only now, so bad files are refused without the seconds a torch import takes.
    import torch

    def split(images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(
            # Writable, C-ordered copies: arrays read from files may be read-only views.
            torch.from_numpy(np.require(images, requirements=["C", "W"])),
            torch.from_numpy(labels.copy()),
        )

    train = split(source.train_images[fit_index], labels[fit_index])
    mean, std = channel_statistics(train.images)
    return Dataset(
        name=name,
        train=train,
        val=split(source.train_images[val_index], labels[val_index]),
        test=split(source.test_images, source.test_labels),
        class_names=source.class_names,
        mean=mean,
        std=std,
        flip=source.flip,
    )


def normalize(
    images: torch.Tensor,
    mean: tuple[float, ...] | torch.Tensor,
    std: tuple[float, ...] | torch.Tensor,
    resolution: int,
) -> torch.Tensor:
    """uint8 (N, C, H, W) to normalized float at `resolution` pixels, channels_last.
    `mean` and `std` may be tensors already on the images' device (no copy is made)."""
    import torch
    import torch.nn.functional as F

    x = images.float().div_(255)
    shape = (1, -1, 1, 1)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    x = (x - mean) / std
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True)
    return x.contiguous(memory_format=torch.channels_last)
