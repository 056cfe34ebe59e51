"""The teacher of knowledge distillation: a large network, trained once per dataset with
no size budget and cached, or a model file the user gives.

Both are model files of objectives/modelfile.py.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compsearch.objectives.catalog import DISTILL_TEMPERATURE, DISTILL_WEIGHT, FOLDER_PREFIX
from compsearch.objectives.data import Dataset
from compsearch.objectives.errors import DataError
from compsearch.objectives.modelfile import load_model, save_model
from compsearch.objectives.train import (
    DeviceData,
    Distillation,
    EpochCallback,
    Phase,
    accuracy,
    fit,
    predict,
    recalibrate_batchnorm,
)
from compsearch.spaces.builder import build
from compsearch.spaces.config import ArchConfig, StageConfig, TrainConfig

# The automatic teacher: a residual network wide enough to beat any student that fits a
# deployment budget, shallow enough to train in a few times a trial's time.
TEACHER_WIDTHS = (64, 128, 256)  # channels of its three stages
TEACHER_DEPTH = 2  # residual blocks per stage
TEACHER_EPOCH_FACTOR = 2  # teacher epochs per epoch of a trial

ProgressCallback = Callable[[str], None]


def residual_arch(
    channels: int, num_classes: int, widths: tuple[int, ...], depth: int
) -> ArchConfig:
    """A CIFAR-style ResNet: a stage of `depth` basic blocks per width, the first at full
    resolution, each later one halving it."""
    stages = tuple(
        StageConfig(
            block="basic",
            depth=depth,
            width=width,
            kernel_size=3,
            stride=1 if index == 0 else 2,
            hidden_widths=(width,) * depth,
            projection=index > 0,
        )
        for index, width in enumerate(widths)
    )
    return ArchConfig(
        in_channels=channels,
        num_classes=num_classes,
        stem_width=widths[0],
        stem_kernel_size=3,
        activation="relu",
        leaky_relu_slope=0.01,
        stages=stages,
    )


def teacher_arch(channels: int, num_classes: int) -> ArchConfig:
    return residual_arch(channels, num_classes, TEACHER_WIDTHS, TEACHER_DEPTH)


def teacher_file(out: Path, data: Dataset, seed: int, subset: int | None) -> Path:
    """Where the automatic teacher of a dataset, split (seed) and subset is cached."""
    name = data.name
    if name.startswith(FOLDER_PREFIX):  # the folder's name and a digest of its whole path
        path = Path(name.removeprefix(FOLDER_PREFIX)).resolve()
        name = f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    name += f"-seed{seed}"
    if subset is not None:
        name += f"-subset{subset}"
    return out / "teachers" / f"{name}.pt"


def train_teacher(
    data: DeviceData,
    arch: ArchConfig,
    schedule: TrainConfig,
    seed: int,
    on_epoch: EpochCallback | None = None,
) -> nn.Module:
    """The automatic teacher, trained at the data's own resolution for
    TEACHER_EPOCH_FACTOR times a trial's epochs."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build(arch).to(data.device).to(memory_format=torch.channels_last)
    phase = Phase.of(schedule, data.resolution, schedule.epochs * TEACHER_EPOCH_FACTOR)
    fit(model, data, phase, generator, on_epoch)
    recalibrate_batchnorm(model, data, data.resolution, schedule.batch_size)
    return model


def check_teacher(arch: ArchConfig, data: Dataset, path: Path) -> None:
    if (arch.in_channels, arch.num_classes) != (data.channels, data.num_classes):
        raise DataError(
            f"teacher {path} takes {arch.in_channels}-channel images and predicts "
            f"{arch.num_classes} classes, but {data.name} has {data.channels} channels and "
            f"{data.num_classes} classes; give a teacher trained on this dataset or --teacher auto"
        )


def prepare_teacher(
    spec: str,
    data: Dataset,
    on_device: DeviceData,
    out: Path,
    schedule: TrainConfig,
    seed: int,
    subset: int | None,
    weight: float = DISTILL_WEIGHT,
    temperature: float = DISTILL_TEMPERATURE,
    say: ProgressCallback | None = None,
    on_epoch: EpochCallback | None = None,
) -> Distillation | None:
    """The distillation `--teacher` asks for: None for "none"; for "auto" the cached
    teacher of this dataset, trained first when there is none; otherwise the model file
    `spec`. Raises DataError when the file cannot serve as this dataset's teacher."""
    if spec == "none":
        return None
    say = say or (lambda _: None)
    if spec == "auto":
        path = teacher_file(out, data, seed, subset)
        if path.exists():
            saved = load_model(path)
            model, arch = saved.model, saved.arch
            check_teacher(arch, data, path)
            val = saved.facts.get("val_accuracy", float("nan"))
            say(f"teacher: {path} (validation accuracy {val:.2%})")
        else:
            arch = teacher_arch(data.channels, data.num_classes)
            say(
                f"teacher: training one for {data.name} ({schedule.epochs * TEACHER_EPOCH_FACTOR} "
                f"epochs), cached as {path}"
            )
            started = time.perf_counter()
            model = train_teacher(on_device, arch, schedule, seed, on_epoch)
            val = accuracy(
                predict(model, on_device.val, on_device, data.resolution), on_device.val.labels
            )
            save_model(path, model, arch, val_accuracy=val, seed=seed, dataset=data.name)
            seconds = time.perf_counter() - started
            say(f"teacher: validation accuracy {val:.2%} after {seconds:.0f} s")
    else:
        path = Path(spec)
        saved = load_model(path)
        model, arch = saved.model, saved.arch
        check_teacher(arch, data, path)
        val = accuracy(
            predict(model.to(on_device.device), on_device.val, on_device, data.resolution),
            on_device.val.labels,
        )
        say(f"teacher: {path} (validation accuracy {val:.2%})")
    model = model.to(on_device.device).to(memory_format=torch.channels_last).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return Distillation(model, weight, temperature, data.resolution)
