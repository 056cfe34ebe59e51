"""Datasets held as whole uint8 tensors, split once, augmented a batch at a time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compsearch.objectives.catalog import SHAPES
from compsearch.objectives.formats import DataError

DATASETS = tuple(SHAPES)


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
    # digits has no official test split: a stratified 20% chosen once, with its own fixed
    # seed, serves as one, so every study on digits is tested on the same images.
    train, test = stratified_split(labels, 0.2, seed=20240101)
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
    from compsearch.objectives.formats import read_idx

    fashion = name == "fashion-mnist"
    folder = find_idx_folder(data_dir, fashion) if data_dir.is_dir() else None
    if folder is None:
        raise DataError(
            f"no {name} IDX files under {data_dir} (looked for {IDX_FILES['train_images']}"
            "[.gz] up to three folders down); set --data-dir to the folder that holds them"
        )
    arrays = {}
    for key, stem in IDX_FILES.items():
        found = [folder / (stem + ext) for ext in (".gz", "") if (folder / (stem + ext)).exists()]
        if not found:
            raise DataError(f"{folder / stem}[.gz] is missing; {name} needs all four IDX files")
        arrays[key] = read_idx(found[0])
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


def load_dataset(
    name: str = "digits",
    seed: int = 0,
    val_fraction: float = 0.2,
    subset: int | None = None,
    data_dir: Path = Path("data"),
) -> Dataset:
    """The dataset split into train, validation (stratified, fixed by `seed`) and test."""
    if name == "digits":
        source = read_digits()
    elif name in ("mnist", "fashion-mnist"):
        source = read_mnist_like(name, Path(data_dir))
    else:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    labels = source.train_labels
    present = np.unique(labels)
    if len(present) < 2:
        raise DataError(f"{name} has {len(present)} class in its training split; it needs two")
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

    def split(images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(
            # Writable, C-ordered copies: arrays read from files may be read-only views.
            torch.from_numpy(np.require(images, requirements=["C", "W"])),
            torch.from_numpy(labels.copy()),
        )

    train = split(source.train_images[fit_index], labels[fit_index])
    scaled = train.images.float() / 255
    return Dataset(
        name=name,
        train=train,
        val=split(source.train_images[val_index], labels[val_index]),
        test=split(source.test_images, source.test_labels),
        class_names=source.class_names,
        mean=tuple(scaled.mean(dim=(0, 2, 3)).tolist()),
        std=tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()),
        flip=source.flip,
    )


def normalize(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], resolution: int
) -> torch.Tensor:
    """uint8 (N, C, H, W) to normalized float at `resolution` pixels, channels_last."""
    x = images.float().div_(255)
    shape = (1, -1, 1, 1)
    x = (x - torch.tensor(mean, device=x.device).view(shape)) / torch.tensor(
        std, device=x.device
    ).view(shape)
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True)
    return x.contiguous(memory_format=torch.channels_last)


def augment(images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to `pad` pixels (zero fill) and optional flips, per image."""
    n, c, h, w = images.shape
    device = images.device
    out = images
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(c, device=device)[None, :, None, None]
        out = padded[batch, channel, rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(device)
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out
