"""Names and defaults of objectives/ that are needed before torch is imported: what each
named dataset looks like (so the budgets can be checked against the search space before
anything is read), how a folder dataset is named, the distillation defaults and the
names inside every exported file. This module imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass

CACHE_FOLDER = "cache"  # under --out: where decoded folder: datasets are cached
FOLDER_PREFIX = "folder:"  # `folder:PATH` names a dataset of the user's own images

DISTILL_WEIGHT = 0.5  # share of a student's loss from the teacher
DISTILL_TEMPERATURE = 4.0  # softening of both distributions

INPUT_NAME = "input"  # of the exported file's one input
OUTPUT_NAME = "logits"  # of its one output


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
