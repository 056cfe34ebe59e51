"""Datasets held as whole uint8 tensors, split once, augmented a batch at a time."""

from __future__ import annotations

from dataclasses import dataclass

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


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; scale to the usual 0..255.
    images = np.clip(np.rint(digits.images * (255 / 16)), 0, 255).astype(np.uint8)
    return images[:, None], digits.target.astype(np.int64), tuple(str(n) for n in range(10))


def load_dataset(
    name: str = "digits",
    seed: int = 0,
    val_fraction: float = 0.2,
    subset: int | None = None,
) -> Dataset:
    if name != "digits":
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    images, labels, class_names = load_digits_arrays()
    # digits has no official test split: a stratified 20% chosen once, with its own fixed
    # seed, serves as one, so every study on digits is tested on the same images.
    train_index, test_index = stratified_split(labels, 0.2, seed=20240101)
    fit_index, val_index = stratified_split(labels[train_index], val_fraction, seed)
    fit_index = train_index[fit_index]
    val_index = train_index[val_index]
    if subset is not None:
        if subset < len(class_names):
            raise DataError(
                f"--subset {subset} is smaller than the {len(class_names)} classes; "
                "give at least one image per class"
            )
        if subset < len(fit_index):
            keep, _ = stratified_split(labels[fit_index], 1 - subset / len(fit_index), seed)
            fit_index = fit_index[keep]

    def split(index: np.ndarray) -> Split:
        return Split(torch.from_numpy(images[index]), torch.from_numpy(labels[index]))

    train = split(fit_index)
    scaled = train.images.float() / 255
    return Dataset(
        name=name,
        train=train,
        val=split(val_index),
        test=split(test_index),
        class_names=class_names,
        mean=tuple(scaled.mean(dim=(0, 2, 3)).tolist()),
        std=tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()),
        flip=False,
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
