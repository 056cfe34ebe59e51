"""Params, MACs and ONNX bytes of a config, computed from its shapes alone.

These decide whether a config is trained at all, so they need no model: a config that
cannot meet the budgets costs microseconds, not a training run.
"""

from __future__ import annotations

from dataclasses import dataclass

from compsearch.spaces.blocks import LayerCounts, conv_bn_counts, get_block, out_resolution
from compsearch.spaces.config import ArchConfig, StageConfig, TrialConfig, with_widths
from compsearch.spaces.space import SearchSpace


@dataclass(frozen=True)
class Estimate:
    params: int
    macs: int  # per image at the test resolution, counted as ptflops' aten backend does
    onnx_bytes: int  # expected size of the deployable file at the config's precision

    @property
    def size_kb(self) -> float:
        return self.onnx_bytes / 1000


def kept_channels(channels: int, prune_ratio: float) -> int:
    """Channels torch-pruning keeps in a group under local pruning at `prune_ratio`.

    The same expression as torch-pruning's, so the estimate matches the pruned model.
    """
    return int(channels * (1 - prune_ratio))


def pruned_arch(arch: ArchConfig, prune_ratio: float) -> ArchConfig:
    if prune_ratio <= 0:
        return arch
    stage_widths = [
        (
            kept_channels(stage.width, prune_ratio),
            tuple(kept_channels(hidden, prune_ratio) for hidden in stage.hidden_widths),
        )
        for stage in arch.stages
    ]
    return with_widths(arch, kept_channels(arch.stem_width, prune_ratio), stage_widths)


def count_layers(arch: ArchConfig, resolution: int) -> LayerCounts:
    """Counts of the whole network for `resolution` x `resolution` inputs."""
    counts = conv_bn_counts(arch.in_channels, arch.stem_width, arch.stem_kernel_size, resolution)
    counts += LayerCounts(activations=1)
    side = resolution
    in_width = arch.stem_width
    for stage in arch.stages:
        block = get_block(stage.block)
        for index in range(stage.depth):
            stride = stage.stride if index == 0 else 1
            counts += block.count(
                in_width,
                stage.width,
                stage.hidden_widths[index],
                stage.kernel_size,
                stride,
                stage.projection and index == 0,
                side,
            )
            side = out_resolution(side, stride)
            in_width = stage.width
    classifier = in_width * arch.num_classes + arch.num_classes
    return counts + LayerCounts(params=classifier, macs=classifier)


# Bytes of an ONNX file beyond its weights: graph structure and, for int8, quantization
# parameters. Fitted to exported files by bench/calibrate_onnx_bytes.py, which prints the
# constants and the estimate's error; rerun it when the export changes.
FIXED_BYTES = {"fp32": 256, "fp16": 318, "int8": 877}
BYTES_PER_CONVOLUTION = {"fp32": 160, "fp16": 159, "int8": 416}
BYTES_PER_ADDITION = {"fp32": 22, "fp16": 22, "int8": 152}
BYTES_PER_ACTIVATION = {
    "fp32": {"relu": 19, "leaky_relu": 41, "silu": 45, "hardswish": 24},
    "fp16": {"relu": 20, "leaky_relu": 42, "silu": 46, "hardswish": 25},
    "int8": {"relu": 17, "leaky_relu": 172, "silu": 292, "hardswish": 356},
}
INT8_BYTES_PER_BIAS = 17  # int32 bias, its scale and the weight's scale and zero point


def weight_bytes(counts: LayerCounts, num_classes: int, precision: str) -> int:
    # ONNX export folds each batch norm into the convolution before it: the norm's two
    # parameters per channel become one convolution bias per channel.
    stored = counts.params - counts.batchnorm_channels
    if precision == "fp32":
        return 4 * stored
    if precision == "fp16":
        return 2 * stored
    if precision == "int8":
        biases = counts.batchnorm_channels + num_classes
        return (stored - biases) + INT8_BYTES_PER_BIAS * biases
    raise ValueError(f"unknown precision {precision!r}; valid: fp32, fp16, int8")


def onnx_bytes(counts: LayerCounts, num_classes: int, precision: str, activation: str) -> int:
    overhead = (
        FIXED_BYTES[precision]
        + BYTES_PER_CONVOLUTION[precision] * counts.convolutions
        + BYTES_PER_ADDITION[precision] * counts.additions
        + BYTES_PER_ACTIVATION[precision][activation] * counts.activations
    )
    return weight_bytes(counts, num_classes, precision) + overhead


def estimate(config: TrialConfig) -> Estimate:
    arch = pruned_arch(config.arch, config.compress.prune_ratio)
    counts = count_layers(arch, config.train.test_resolution)
    return Estimate(
        params=counts.params,
        macs=counts.macs,
        onnx_bytes=onnx_bytes(counts, arch.num_classes, config.compress.precision, arch.activation),
    )


def smallest_estimate(space: SearchSpace) -> Estimate:
    """The smallest params, bytes and MACs any config of `space` reaches (each on its own).

    Narrowest widths, shallowest stages, most pruning, largest strides and smallest
    kernels give the smallest model; blocks, activations and precisions are compared.
    """
    candidates = []
    for block in space.blocks:
        stages = []
        in_width = space.stem_width[0]
        for _ in range(space.stages):
            width = space.width[0]
            stride = max(space.strides)
            stages.append(
                StageConfig(
                    block=block,
                    depth=space.depth[0],
                    width=width,
                    kernel_size=min(space.kernel_sizes),
                    stride=stride,
                    hidden_widths=(width,) * space.depth[0],
                    projection=stride != 1 or in_width != width,
                )
            )
            in_width = width
        for activation in space.activations:
            arch = ArchConfig(
                in_channels=space.in_channels,
                num_classes=space.num_classes,
                stem_width=space.stem_width[0],
                stem_kernel_size=3,
                activation=activation,
                leaky_relu_slope=0.1,
                stages=tuple(stages),
            )
            arch = pruned_arch(arch, space.prune_ratio[1])
            counts = count_layers(arch, space.test_resolution)
            for precision in space.precisions:
                candidates.append(
                    Estimate(
                        counts.params,
                        counts.macs,
                        onnx_bytes(counts, arch.num_classes, precision, activation),
                    )
                )
    return Estimate(
        params=min(c.params for c in candidates),
        macs=min(c.macs for c in candidates),
        onnx_bytes=min(c.onnx_bytes for c in candidates),
    )
