"""What one trial's training and measuring costs, counted from its config's shapes, in the
units a device's seconds are close to linear in. search/cost.py turns these into seconds
with coefficients measured on the device."""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

from compsearch.spaces.blocks import LayerCounts
from compsearch.spaces.config import TrialConfig
from compsearch.spaces.estimate import count_layers, expected_pruned_arch

# Images a trial runs forward only beyond its training epochs: the batch-norm
# recalibration (objectives/train.py RECALIBRATION_IMAGES) and the Taylor ranking's batch.
FORWARD_IMAGES = 4096 + 512
# A forward pass costs about a third of a training step (forward, backward, update).
FORWARD_SHARE = 1 / 3


@dataclass(frozen=True)
class Work:
    """One trial's work. Seconds are about sum(coefficient * figure) over these fields."""

    mac_images: float  # multiply-accumulates per image x images, training steps' worth
    value_images: float  # values convolutions write per image x images: memory traffic
    node_steps: float  # graph nodes x optimizer steps: per-operation overhead
    pixel_images: float  # input values x images through augmentation and normalization
    deployed_nodes: float  # nodes of the deployed network: export and onnxruntime sessions
    int8_nodes: float  # the same for an int8 file (calibration, quantize-dequantize pairs)
    # MACs of the pruned network x images the training saw, for an int8 config: what a
    # quantization-aware fine-tune costs when int8 loses too much (it sees a fixed share
    # of those images; its coefficient learns that share and how often it runs).
    int8_finetune: float
    trials: float = 1.0  # what every trial pays whatever its size: setup, files, records

    def vector(self) -> tuple[float, ...]:
        return astuple(self)

    @classmethod
    def of(cls, values: list[float] | tuple[float, ...]) -> Work:
        return cls(*values)


def nodes(counts: LayerCounts) -> int:
    """Operations in a network's graph, as LayerCounts counts them."""
    return (
        counts.convolutions + counts.activations + counts.additions
        + 3 * counts.squeeze_excitations + 1
    )  # fmt: skip


def training_work(
    config: TrialConfig, train_images: int, val_images: int, data_resolution: int, channels: int
) -> Work:
    """The work of `run_trial` on this config: the low-resolution epochs on the unpruned
    network, the fine-tune at the test resolution on the pruned one, the forward passes
    that check, recalibrate and measure it (torch and the file, on the validation split),
    and writing the file."""
    train, arch = config.train, config.arch
    low_epochs = train.epochs - train.finetune_epochs
    finetune_epochs = config.finetune_epochs  # stretched by pruning
    full = count_layers(arch, train.train_resolution)
    pruned = count_layers(expected_pruned_arch(arch, config.compress), train.test_resolution)
    steps = math.ceil(train_images / train.batch_size)
    forward_full = val_images
    forward_pruned = 2 * val_images + FORWARD_IMAGES
    int8 = config.compress.precision == "int8"

    def images_through(field: str) -> float:
        return (
            getattr(full, field) * train_images * low_epochs
            + getattr(pruned, field) * train_images * finetune_epochs
            + FORWARD_SHARE
            * (getattr(full, field) * forward_full + getattr(pruned, field) * forward_pruned)
        )

    return Work(
        mac_images=images_through("macs"),
        value_images=images_through("activation_values"),
        node_steps=steps * (nodes(full) * low_epochs + nodes(pruned) * finetune_epochs),
        pixel_images=train_images * config.epochs * channels * data_resolution**2,
        deployed_nodes=nodes(pruned),
        int8_nodes=nodes(pruned) if int8 else 0,
        int8_finetune=pruned.macs * train_images * train.epochs if int8 else 0,
    )


def probe_work(
    config: TrialConfig, images: int, resolution: int, data_resolution: int, channels: int
) -> Work:
    """The work of training the unpruned network of `config` on `images` images at
    `resolution` for one epoch, with nothing else: what a calibration run times."""
    counts = count_layers(config.arch, resolution)
    steps = math.ceil(images / config.train.batch_size)
    return Work(
        mac_images=counts.macs * images,
        value_images=counts.activation_values * images,
        node_steps=nodes(counts) * steps,
        pixel_images=images * channels * data_resolution**2,
        deployed_nodes=0.0,
        int8_nodes=0.0,
        int8_finetune=0.0,
        trials=0.0,
    )


def latency_features(config: TrialConfig) -> tuple[float, ...]:
    """What one inference of the config's deployable file does, as the latency model
    weighs it: MACs, values the convolutions write, graph nodes, and 1 (a fixed cost per
    run). The widths are those pruning leaves (exact for local pruning)."""
    arch = expected_pruned_arch(config.arch, config.compress)
    counts = count_layers(arch, config.train.test_resolution)
    return (float(counts.macs), float(counts.activation_values), float(nodes(counts)), 1.0)
