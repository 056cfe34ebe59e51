"""What each named dataset looks like, known without loading it (and without torch), so
the budgets can be checked against the search space before anything is read."""

from __future__ import annotations

from dataclasses import dataclass

CACHE_FOLDER = "cache"  # under --out: where decoded folder: datasets are cached


@dataclass(frozen=True)
class DatasetShape:
    channels: int
    resolution: int  # pixels, side of the square images
    num_classes: int


SHAPES = {
    "digits": DatasetShape(channels=1, resolution=8, num_classes=10),
    "mnist": DatasetShape(channels=1, resolution=28, num_classes=10),
    "fashion-mnist": DatasetShape(channels=1, resolution=28, num_classes=10),
    "cifar10": DatasetShape(channels=3, resolution=32, num_classes=10),
    "cifar100": DatasetShape(channels=3, resolution=32, num_classes=100),
    "svhn": DatasetShape(channels=3, resolution=32, num_classes=10),
    "stl10": DatasetShape(channels=3, resolution=96, num_classes=10),
}
# `folder:PATH` datasets are absent: their shape is known only once their images are read.
