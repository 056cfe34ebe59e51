"""Frozen dataclasses that describe one trial: its architecture, training and compression.

A config is plain data: it holds no torch objects, so it can be stored in an Optuna trial,
written to JSON beside a model and turned back into the same network by `build`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from compsearch.spaces.blocks import BlockShape

PRECISIONS = ("fp32", "fp16", "int8")
# What a trial's deployable file can be (run --format): ONNX at any precision, or an int8
# .tflite file.
FILE_FORMATS = ("onnx", "tflite")
# How pruning ranks channels: the L2 norm of their weights, their batch-norm scale, or
# the first-order Taylor estimate of the loss change when they are removed.
PRUNE_CRITERIA = ("l2", "bn_scale", "taylor")
# "local": every layer loses the same share of its channels; "global": channels compete
# across layers, so unimportant layers lose more.
PRUNE_SCOPES = ("local", "global")
MAX_PRUNE_FRACTION = 0.9  # beyond this a network is mostly gone
# The fine-tune after pruning lasts the schedule's fine-tune epochs over the share of the
# parameters kept, at most this many times as long. A pruned network costs about that
# share of the unpruned one's MACs per image, so its fine-tune costs about what the
# unpruned one's would. On ResNet-8 (CIFAR-10, 20,000 images, 12 epochs), pruned to 30%
# of its parameters: 10 epochs of fine-tune ended 0.14 points above the unpruned model,
# 3 epochs 3.53 below it (README, "int8 on CIFAR-10").
MAX_FINETUNE_STRETCH = 4.0


@dataclass(frozen=True)
class StageConfig:
    block: str  # name in the block registry
    depth: int  # number of blocks
    width: int  # output channels of every block in the stage
    kernel_size: int
    stride: int  # stride of the first block; the others keep the resolution
    # Inner width of each block. Equal to `width` when sampled; pruning narrows them.
    hidden_widths: tuple[int, ...]
    # Whether the first block's shortcut is a 1x1 projection. Fixed when sampled, so a
    # pruned model whose widths happen to line up still rebuilds with the same structure.
    projection: bool
    groups: int = 1  # groups of the k x k convolution of "grouped" blocks
    # Squeeze-and-excitation inner width of each block; empty when the stage has none.
    squeeze_widths: tuple[int, ...] = ()


@dataclass(frozen=True)
class ArchConfig:
    in_channels: int
    num_classes: int
    stem_width: int
    stem_kernel_size: int
    activation: str  # name in the activation registry
    leaky_relu_slope: float  # negative slope, used when activation == "leaky_relu"
    stages: tuple[StageConfig, ...]

    @property
    def final_width(self) -> int:
        return self.stages[-1].width if self.stages else self.stem_width


@dataclass(frozen=True)
class TrainConfig:
    # Total epochs, low-resolution plus fine-tune, before pruning stretches the fine-tune
    # (TrialConfig.epochs and TrialConfig.finetune_epochs count what a trial trains).
    epochs: int
    finetune_epochs: int  # epochs at the test resolution after pruning (FixRes)
    train_resolution: int  # pixels, side of the square images in the low-resolution phase
    test_resolution: int  # pixels, the resolution the deployed model sees
    batch_size: int
    learning_rate: float  # peak learning rate of the low-resolution phase
    weight_decay: float
    label_smoothing: float
    cutout: int = 0  # pixels, side of the square of each training image zeroed; 0: none


@dataclass(frozen=True)
class CompressConfig:
    precision: str  # "fp32", "fp16" or "int8": the ONNX file's weight format
    # Fraction of the model's parameters that pruning removes (0 = none), whole channels
    # at a time; see PRUNE_CRITERIA and PRUNE_SCOPES for the other two.
    prune_fraction: float
    prune_criterion: str = "l2"
    prune_scope: str = "local"


@dataclass(frozen=True)
class TrialConfig:
    arch: ArchConfig
    train: TrainConfig
    compress: CompressConfig

    @property
    def finetune_epochs(self) -> int:
        """Epochs of the fine-tune at the test resolution after pruning: the schedule's,
        stretched by the share pruning removes (see MAX_FINETUNE_STRETCH)."""
        kept = 1 - self.compress.prune_fraction
        stretch = min(MAX_FINETUNE_STRETCH, 1 / kept) if kept > 0 else MAX_FINETUNE_STRETCH
        return round(self.train.finetune_epochs * stretch)

    @property
    def epochs(self) -> int:
        """Epochs the trial trains in all: the low-resolution ones, then the fine-tune."""
        return self.train.epochs - self.train.finetune_epochs + self.finetune_epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialConfig:
        return cls(
            arch=arch_from_dict(data["arch"]),
            train=TrainConfig(**data["train"]),
            compress=CompressConfig(**data["compress"]),
        )


def arch_from_dict(data: dict[str, Any]) -> ArchConfig:
    """The architecture `dataclasses.asdict` wrote (lists where tuples were)."""
    arch = dict(data)
    stages = []
    for stage in arch.pop("stages"):
        stage = dict(stage)
        stage["hidden_widths"] = tuple(stage["hidden_widths"])
        stage["squeeze_widths"] = tuple(stage.get("squeeze_widths", ()))
        stages.append(StageConfig(**stage))
    return ArchConfig(**arch, stages=tuple(stages))


StageWidths = tuple[int, tuple[int, ...], tuple[int, ...]]  # width, hidden, squeeze widths


def with_widths(arch: ArchConfig, stem_width: int, stage_widths: list[StageWidths]) -> ArchConfig:
    """The same architecture with other widths: what pruning leaves behind."""
    stages = tuple(
        dataclasses.replace(stage, width=width, hidden_widths=hidden, squeeze_widths=squeeze)
        for stage, (width, hidden, squeeze) in zip(arch.stages, stage_widths, strict=True)
    )
    return dataclasses.replace(arch, stem_width=stem_width, stages=stages)


def block_shapes(arch: ArchConfig) -> list[tuple[StageConfig, BlockShape]]:
    """Every block of the network in order, with the stage it belongs to."""
    shapes = []
    in_width = arch.stem_width
    for stage in arch.stages:
        for index in range(stage.depth):
            first = index == 0
            shape = BlockShape(
                in_width=in_width,
                out_width=stage.width,
                hidden_width=stage.hidden_widths[index],
                kernel_size=stage.kernel_size,
                stride=stage.stride if first else 1,
                projection=stage.projection and first,
                groups=stage.groups,
                squeeze_width=stage.squeeze_widths[index] if stage.squeeze_widths else 0,
            )
            shapes.append((stage, shape))
            in_width = stage.width
    return shapes
