"""Params, MACs and ONNX bytes of a config, computed from its shapes alone.

These decide whether a config is trained at all, so they need no model: a config that
cannot meet the budgets costs microseconds, not a training run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from compsearch.spaces.blocks import (
    LayerCounts,
    aligned_width,
    conv_bn_counts,
    get_block,
    kept_channels,
    out_resolution,
)
from compsearch.spaces.config import (
    FILE_FORMATS,
    PRECISIONS,
    ArchConfig,
    CompressConfig,
    TrialConfig,
    block_shapes,
    with_widths,
)
from compsearch.spaces.memory import VALUE_BYTES, estimate_peak_bytes
from compsearch.spaces.space import SearchSpace, make_stage


@dataclass(frozen=True)
class Estimate:
    params: int
    macs: int  # per image at the test resolution, counted as ptflops' aten backend does
    file_bytes: int  # expected size of the deployable file at the config's precision and format
    # Peak activation memory of one inference of the deployable file (spaces/memory.py);
    # for the space's extremes, bounds that every config lies within.
    ram_bytes: int = 0
    # The least latency the latency model (search/latency.py) allows for the config, in
    # ms: what a --budget-latency rejects on; NaN when no model judged it.
    latency_ms: float = math.nan

    @property
    def size_kb(self) -> float:
        return self.file_bytes / 1000

    @property
    def ram_kb(self) -> float:
        return self.ram_bytes / 1000


def aligned_arch(arch: ArchConfig) -> ArchConfig:
    """The widths `align_channels` (objectives/compress.py) leaves: each rounded down with
    `aligned_width`, except inner widths that a grouped convolution splits."""
    stage_widths = [
        (
            aligned_width(stage.width),
            tuple(w if stage.groups > 1 else aligned_width(w) for w in stage.hidden_widths),
            tuple(aligned_width(w) for w in stage.squeeze_widths),
        )
        for stage in arch.stages
    ]
    return with_widths(arch, aligned_width(arch.stem_width), stage_widths)


MAX_CHANNEL_RATIO = 0.95  # the most of each group's channels local pruning removes


def pruned_arch(arch: ArchConfig, prune_ratio: float, scope: str = "local") -> ArchConfig:
    """The widths torch-pruning leaves when it prunes every channel group of `arch` locally
    at the channel ratio `prune_ratio`. With `scope` "global", the widths global pruning
    leaves whole (`Block.whole_in_global_pruning`) stay as they are."""
    if prune_ratio <= 0:
        return arch
    stage_widths = []
    shapes = iter(block_shapes(arch))
    for stage in arch.stages:
        block = get_block(stage.block)
        pruned = [block.pruned(next(shapes)[1], prune_ratio) for _ in range(stage.depth)]
        whole_width, whole_inner = (
            block.whole_in_global_pruning(stage.depth) if scope == "global" else (False, False)
        )
        stage_widths.append(
            (
                stage.width if whole_width else kept_channels(stage.width, prune_ratio),
                stage.hidden_widths
                if whole_inner
                else tuple(shape.hidden_width for shape in pruned),
                tuple(shape.squeeze_width for shape in pruned) if stage.squeeze_widths else (),
            )
        )
    return with_widths(arch, kept_channels(arch.stem_width, prune_ratio), stage_widths)


# The most of one layer's channels global pruning removes (objectives/compress.py): ranking
# across layers would otherwise empty a layer whose weights happen to be small.
GLOBAL_MAX_LAYER_RATIO = 0.8


def global_pruned_arch(arch: ArchConfig, prune_fraction: float) -> ArchConfig:
    """What global pruning of `prune_fraction` of the parameters is expected to leave:
    the widths it may not thin whole, the others pruned alike, at the least channel ratio
    (at most GLOBAL_MAX_LAYER_RATIO) that reaches the share, or as far as that goes.
    Which channels it removes depends on the trained weights, so this is close, not
    exact (a trial judges the widths it left before its fine-tune)."""
    if prune_fraction <= 0:
        return arch
    ratio = least_ratio(arch, prune_fraction, GLOBAL_MAX_LAYER_RATIO, "global")
    return pruned_arch(arch, ratio, "global")


def expected_pruned_arch(arch: ArchConfig, compress: CompressConfig) -> ArchConfig:
    """The widths pruning as `compress` asks is expected to leave: exact for local
    pruning, close for global pruning."""
    if compress.prune_scope == "global":
        return global_pruned_arch(arch, compress.prune_fraction)
    return pruned_arch(arch, channel_ratio(arch, compress.prune_fraction))


def channel_ratio(arch: ArchConfig, prune_fraction: float) -> float:
    """The channel ratio at which local pruning removes at least `prune_fraction` of the
    parameters of `arch`: the smallest such ratio, found by bisection on exact counts.

    Parameters fall roughly with the square of the kept share of channels, so a channel
    ratio r removes about 1 - (1 - r)^2 of them; this finds the ratio exactly instead.
    Local pruning leaves a channel group alone once the ratio would empty it, so the count
    falls with the ratio only up to the point where the smallest group keeps one channel;
    when that is not enough, the ratio of that point is returned.
    """
    if prune_fraction <= 0:
        return 0.0
    smallest = min((n for n in _channel_groups(arch) if n >= 2), default=2)
    return least_ratio(
        arch, prune_fraction, min(MAX_CHANNEL_RATIO, (1 - 1 / smallest) * (1 - 1e-9))
    )


def least_ratio(
    arch: ArchConfig, prune_fraction: float, most: float, scope: str = "local"
) -> float:
    """The least channel ratio up to `most` at which `pruned_arch(arch, ratio, scope)`
    has at most 1 - `prune_fraction` of the parameters, by bisection on exact counts;
    `most` when even that is not enough."""

    def params(ratio: float) -> int:
        return count_layers(pruned_arch(arch, ratio, scope), 1).params

    target = (1 - prune_fraction) * params(0.0)
    low, high = 0.0, most
    if params(high) > target:
        return high
    for _ in range(24):  # to within 2^-24 of the step where the count drops
        middle = (low + high) / 2
        if params(middle) <= target:
            high = middle
        else:
            low = middle
    return high


def _channel_groups(arch: ArchConfig) -> list[int]:
    """The size of every group of channels local pruning shrinks, as `kept_channels`
    sees them (a grouped convolution's width divided by its groups)."""
    sizes = [arch.stem_width]
    for _, shape in block_shapes(arch):
        sizes += [shape.out_width, shape.hidden_width // shape.groups, shape.squeeze_width]
    return sizes


def stem_counts(arch: ArchConfig, resolution: int) -> LayerCounts:
    counts = conv_bn_counts(arch.in_channels, arch.stem_width, arch.stem_kernel_size, resolution)
    return counts + LayerCounts(activations=1)


def classifier_counts(in_width: int, num_classes: int) -> LayerCounts:
    params = in_width * num_classes + num_classes
    return LayerCounts(params=params, macs=params, biases=num_classes)


def count_layers(arch: ArchConfig, resolution: int) -> LayerCounts:
    """Counts of the whole network for `resolution` x `resolution` inputs."""
    counts = stem_counts(arch, resolution)
    side = resolution
    for stage, shape in block_shapes(arch):
        counts += get_block(stage.block).count(shape, side)
        side = out_resolution(side, shape.stride)
    return counts + classifier_counts(arch.final_width, arch.num_classes)


# Bytes of an ONNX file beyond its weights: graph structure (each node's name, inputs and
# attributes) and, for int8, quantization parameters. Fitted to exported files by
# bench/calibrate_onnx_bytes.py, which prints the constants and the estimate's error as it
# stands; rerun it when the export changes.
FIXED_BYTES = {"fp32": 258, "fp16": 321, "int8": 901}
BYTES_PER_NODE = {
    "fp32": {"convolution": 159, "addition": 22, "squeeze_excitation": 75},
    "fp16": {"convolution": 158, "addition": 23, "squeeze_excitation": 77},
    "int8": {"convolution": 455, "addition": 130, "squeeze_excitation": 394},
}
BYTES_PER_ACTIVATION = {
    "fp32": {"relu": 19, "leaky_relu": 41, "silu": 45, "hardswish": 24},
    "fp16": {"relu": 19, "leaky_relu": 41, "silu": 45, "hardswish": 24},
    # Negative for relu: QDQ drops a relu before a QuantizeLinear, saving bytes that the
    # per-convolution figure counts.
    "int8": {"relu": -17, "leaky_relu": 137, "silu": 255, "hardswish": 327},
}
INT8_BYTES_PER_BIAS = 17  # int32 bias, its scale and the weight's scale and zero point


def weight_bytes(counts: LayerCounts, precision: str) -> int:
    # ONNX export folds each batch norm into the convolution before it: the norm's two
    # parameters per channel become one convolution bias per channel.
    stored = counts.params - counts.batchnorm_channels
    if precision == "fp32":
        return 4 * stored
    if precision == "fp16":
        return 2 * stored
    if precision == "int8":
        biases = counts.batchnorm_channels + counts.biases
        return (stored - biases) + INT8_BYTES_PER_BIAS * biases
    raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")


def node_features(counts: LayerCounts) -> dict[str, int]:
    return {
        "convolution": counts.convolutions,
        "addition": counts.additions,
        "squeeze_excitation": counts.squeeze_excitations,
    }


def variable_bytes(counts: LayerCounts, precision: str, activation: str) -> int:
    """Bytes that grow with the layers: weights and per-node overhead (linear in counts)."""
    per_node = BYTES_PER_NODE[precision]
    structure = sum(per_node[name] * n for name, n in node_features(counts).items())
    structure += BYTES_PER_ACTIVATION[precision][activation] * counts.activations
    return weight_bytes(counts, precision) + structure


def onnx_bytes(counts: LayerCounts, precision: str, activation: str) -> int:
    return FIXED_BYTES[precision] + variable_bytes(counts, precision, activation)


# Bytes of an int8 .tflite file (objectives/tflite.py: names stripped) beyond its int8
# weights: per output channel an int32 bias and the per-channel scales and zero points
# of it and of the weights; per operator its tensors, buffers and options; the file's
# own tables. Fitted to written files by bench/calibrate_onnx_bytes.py --format tflite.
TFLITE_FIXED_BYTES = 1377
TFLITE_BYTES_PER_BIAS = 28
TFLITE_BYTES_PER_NODE = {"convolution": 310, "addition": 100, "squeeze_excitation": 377}
TFLITE_BYTES_PER_ACTIVATION = {"relu": 31, "leaky_relu": 290, "silu": 255, "hardswish": 119}


def tflite_variable_bytes(counts: LayerCounts, activation: str) -> int:
    """The int8 .tflite file's bytes that grow with the layers."""
    biases = counts.batchnorm_channels + counts.biases
    weights = counts.params - counts.batchnorm_channels - biases  # int8, one byte each
    structure = sum(TFLITE_BYTES_PER_NODE[name] * n for name, n in node_features(counts).items())
    structure += TFLITE_BYTES_PER_ACTIVATION[activation] * counts.activations
    return weights + TFLITE_BYTES_PER_BIAS * biases + structure


def check_tflite_precision(precision: str) -> None:
    if precision != "int8":
        raise ValueError(f".tflite files are int8, not {precision}")


def file_bytes(counts: LayerCounts, precision: str, activation: str, file_format: str) -> int:
    """The deployable file's expected bytes: ONNX at `precision`, or an int8 .tflite."""
    if file_format == "onnx":
        return onnx_bytes(counts, precision, activation)
    if file_format == "tflite":
        check_tflite_precision(precision)
        return TFLITE_FIXED_BYTES + tflite_variable_bytes(counts, activation)
    raise ValueError(f"unknown file format {file_format!r}; valid: {', '.join(FILE_FORMATS)}")


def estimate(config: TrialConfig, file_format: str = "onnx") -> Estimate:
    """Exact params, MACs and peak activation memory, and the bytes of the file in
    `file_format`, for local pruning. Global pruning removes the same share of parameters
    but chooses where, so for it these are close, not exact (`global_pruned_arch`)."""
    arch = expected_pruned_arch(config.arch, config.compress)
    resolution = config.train.test_resolution
    counts = count_layers(arch, resolution)
    return Estimate(
        params=counts.params,
        macs=counts.macs,
        file_bytes=file_bytes(counts, config.compress.precision, arch.activation, file_format),
        ram_bytes=estimate_peak_bytes(arch, resolution, config.compress.precision, file_format),
    )


def estimate_pruned(config: TrialConfig, file_format: str = "onnx") -> Estimate:
    """The exact figures of a config whose arch holds the widths pruning left (as
    `train_model` returns it): its prune fraction is spent and removes nothing more."""
    spent = dataclasses.replace(config.compress, prune_fraction=0.0)
    return estimate(dataclasses.replace(config, compress=spent), file_format)


def stage_options(space: SearchSpace, in_width: int, width: int, depth: int):
    """Every stage the space can sample with these widths and depth, one per choice."""
    for block_name in space.blocks:
        block = get_block(block_name)
        expansions = space.expansions if block.uses_expansion else (1.0,)
        groups_choices = space.groups if block.uses_groups else (1,)
        for kernel_size, stride, squeeze, expansion, groups in itertools.product(
            space.kernel_sizes, space.strides, space.squeeze_excitation, expansions, groups_choices
        ):
            yield make_stage(
                block_name, depth, in_width, width, kernel_size, stride, expansion, groups, squeeze
            )


def extreme_estimate(space: SearchSpace, smallest: bool, file_format: str = "onnx") -> Estimate:
    """The smallest (or largest) params, bytes and MACs any config of `space` reaches,
    each figure on its own.

    Stages are independent once their input width is fixed, so each stage's extreme is
    found among its own choices; the network's is the sum. Smallest: narrowest widths,
    fewest blocks, most pruning; largest: widest, deepest, no pruning.
    """
    pick = min if smallest else max
    index = 0 if smallest else 1
    # Bounds on what pruning a fraction f of the parameters leaves: a channel ratio of f
    # leaves at most (1 - f) of them (quadratic terms keep (1 - f)^2), so the ratio local
    # pruning needs is at most f. Rounding widths down (CHANNEL_ALIGNMENT, where a
    # benchmark sets it) removes more, so the ratio it needs can be as small as zero: the
    # largest model is the unpruned one.
    ratio = space.prune_fraction[1] if smallest else 0.0
    stem_width = space.stem_width[index]
    width = space.width[index]
    side = space.test_resolution
    stem = ArchConfig(space.in_channels, space.num_classes, stem_width, 3, "relu", 0.1, stages=())
    parts = [[stem_counts(pruned_arch(stem, ratio), side)]]
    in_width = stem_width
    for _ in range(space.stages):
        options = []
        for stage in stage_options(space, in_width, width, space.depth[index]):
            arch = pruned_arch(
                dataclasses.replace(stem, stem_width=in_width, stages=(stage,)), ratio
            )
            counts, block_side = LayerCounts(), side
            for owner, shape in block_shapes(arch):
                counts += get_block(owner.block).count(shape, block_side)
                block_side = out_resolution(block_side, shape.stride)
            options.append(counts)
        parts.append(options)
        # MACs: the extreme model takes the largest (smallest) strides everywhere.
        side = out_resolution(side, max(space.strides) if smallest else min(space.strides))
        in_width = width
    last = kept_channels(width, ratio)
    parts.append([classifier_counts(last, space.num_classes)])

    def variable(counts: LayerCounts, precision: str, activation: str) -> int:
        if file_format == "tflite":
            return tflite_variable_bytes(counts, activation)
        return variable_bytes(counts, precision, activation)

    fixed = TFLITE_FIXED_BYTES if file_format == "tflite" else None
    sizes = [
        (FIXED_BYTES[precision] if fixed is None else fixed)
        + sum(
            pick(variable(counts, precision, activation) for counts in options) for options in parts
        )
        for precision in space.precisions
        for activation in space.activations
    ]
    return Estimate(
        params=sum(pick(counts.params for counts in options) for options in parts),
        macs=sum(pick(counts.macs for counts in options) for options in parts),
        file_bytes=pick(sizes),
        ram_bytes=ram_bound(space, smallest),
    )


def ram_bound(space: SearchSpace, smallest: bool) -> int:
    """A bound on the peak activation bytes of every config of `space`: below, what the
    stem's convolution alone holds (the input and the narrowest stem output, both at
    full resolution, at the space's fewest bytes per value; pruning may leave the stem
    a single channel); above, the fp32 input and
    five of the largest tensor any layer can write (no operator holds more than four
    full tensors at once: a SiLU's two inside a branch whose block input waits for the
    sum, with its output; the fifth covers squeeze-and-excitation's vectors)."""
    pixels = space.test_resolution**2
    if smallest:
        stem = space.stem_width[0] if space.prune_fraction[1] == 0 else 1
        value_bytes = min(VALUE_BYTES[precision] for precision in space.precisions)
        return (space.in_channels + stem) * pixels * value_bytes
    expansion = max(space.expansions) if "inverted" in space.blocks else 1
    channels = max(space.stem_width[1], space.width[1]) * expansion + max(space.groups)
    return 4 * (space.in_channels + 5 * channels) * pixels
