"""Block types by name: how each is built, what it holds and costs, how pruning narrows it.

A block type is one class and one `@register_block` line. The class states its parameter
and MAC counts analytically, so budgets are checked before anything is built; the
contract tests hold the formulas to the real modules. This module imports no torch: the
budget checks that run before any training stay fast. `build` imports the layers lazily.

MACs follow ptflops' aten backend: a convolution costs out_elements * in/groups * k * k,
plus out_elements when it has a bias.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from torch import nn

    from compsearch.spaces.layers import ActivationFactory

ACTIVATIONS = ("relu", "leaky_relu", "silu", "hardswish")


class Tracer(Protocol):
    """What `Block.trace` writes its operators with (spaces/memory.py's Tracer): each
    call adds the operators of one layer on numbered tensors and returns its output."""

    def conv(self, x: int, channels: int, side: int) -> int: ...
    def activation(self, x: int, channels: int, side: int) -> int: ...
    def sum(self, a: int, b: int, channels: int, side: int) -> int: ...
    def squeeze_excite(self, x: int, channels: int, squeeze_width: int, side: int) -> int: ...


@dataclass(frozen=True)
class LayerCounts:
    """What a part of a network holds and costs, counted from its shapes.

    The node counts (convolutions, activations, ...) let the ONNX file's bytes beyond
    its weights be estimated: each node costs its name, inputs and attributes.
    """

    params: int = 0
    macs: int = 0  # per image
    batchnorm_channels: int = 0  # folded into convolution biases by ONNX export
    biases: int = 0  # bias values of layers that have their own (not from a batch norm)
    convolutions: int = 0
    activations: int = 0
    additions: int = 0  # residual sums
    # Squeeze-and-excitation modules: each adds a pool, a sigmoid and a product beyond
    # its two convolutions and activation.
    squeeze_excitations: int = 0
    # Values the convolutions write per image (channels x height x width of each output):
    # memory traffic, which sets the time of depthwise and 1x1 layers more than MACs do.
    activation_values: int = 0

    def __add__(self, other: LayerCounts) -> LayerCounts:
        return LayerCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass(frozen=True)
class BlockShape:
    """The widths and options of one block, as the builder and the counts need them."""

    in_width: int
    out_width: int
    hidden_width: int  # the block's inner width; see each block for what it means
    kernel_size: int
    stride: int
    # A 1x1 convolution shortcut (residual blocks); for the inverted residual block, no
    # shortcut at all, as in MobileNet v2 when the shapes differ.
    projection: bool
    groups: int = 1  # groups of the grouped block's k x k convolution
    squeeze_width: int = 0  # inner width of squeeze-and-excitation; 0 means none


def out_resolution(resolution: int, stride: int) -> int:
    """Side of the output of a convolution with padding k // 2 (odd k)."""
    return math.ceil(resolution / stride)


def conv_bn_counts(
    in_width: int, out_width: int, kernel_size: int, out_side: int, groups: int = 1
) -> LayerCounts:
    """A bias-free convolution followed by a batch norm."""
    weights = out_width * (in_width // groups) * kernel_size * kernel_size
    return LayerCounts(
        params=weights + 2 * out_width,
        macs=out_side * out_side * weights,
        batchnorm_channels=out_width,
        convolutions=1,
        activation_values=out_width * out_side * out_side,
    )


def squeeze_excite_counts(channels: int, squeeze_width: int) -> LayerCounts:
    """Global pool, 1x1 conv (with bias) to `squeeze_width`, activation, 1x1 conv back,
    sigmoid, and the product with the input."""
    if squeeze_width == 0:
        return LayerCounts()
    weights = 2 * channels * squeeze_width
    biases = channels + squeeze_width
    return LayerCounts(
        params=weights + biases,
        macs=weights + biases,
        biases=biases,
        convolutions=2,
        activations=1,
        squeeze_excitations=1,
    )


def squeeze_width_for(channels: int) -> int:
    """Squeeze-and-excitation inner width: a quarter of the gated channels."""
    return max(1, channels // 4)


# Pruning can round the widths it leaves down to a multiple of this, when above it; 1:
# not at all, the default. Multiples of 8 train faster per image (ResNet-8 at 11/22/45
# channels trained at 1,195 images/s, at 16/24/48 at 1,921 on an AVX-512 EPYC: `python
# bench/width_speed.py`), but in narrow networks they are too coarse a grid: on ResNet-8
# (CIFAR-10, `bench/compression_fidelity.py --alignment 8`) they removed 66% of the
# parameters where half was asked and lost 1.00 point in int8, where widths left as
# pruned lost 0.22 at 51% (README, "Compression").
CHANNEL_ALIGNMENT = 1


def aligned_width(channels: int) -> int:
    """`channels` rounded down to a multiple of CHANNEL_ALIGNMENT, if above it (read at
    every call, so a benchmark may set it)."""
    if channels <= CHANNEL_ALIGNMENT:
        return channels
    return channels - channels % CHANNEL_ALIGNMENT


def kept_channels(channels: int, prune_ratio: float, groups: int = 1) -> int:
    """Channels local pruning keeps in a group it prunes at `prune_ratio`.

    First torch-pruning's rules: it keeps int(n * (1 - ratio)) of each of `groups` equal
    parts, and leaves a group alone when that would keep nothing or when it has a single
    channel. Then `align_channels` (objectives/compress.py) rounds the width down with
    `aligned_width`, except where a grouped convolution splits it (groups > 1).
    """
    if prune_ratio <= 0 or channels <= 1:
        return channels
    per_group = channels // groups
    kept = int(per_group * (1 - prune_ratio))
    kept = channels if kept < 1 else kept * groups
    return kept if groups > 1 else aligned_width(kept)


class Block:
    """Interface of a block type. Subclasses are never instantiated: they describe."""

    # Which searched options the block uses; the others do not change it.
    uses_expansion: ClassVar[bool] = False
    uses_groups: ClassVar[bool] = False

    @staticmethod
    def hidden_width(in_width: int, out_width: int, expansion: float, groups: int) -> int:
        """The inner width of a freshly sampled block."""
        return out_width

    @staticmethod
    def gated_width(shape: BlockShape) -> int:
        """Channels that squeeze-and-excitation gates."""
        return shape.out_width

    @staticmethod
    def count(shape: BlockShape, in_side: int) -> LayerCounts:
        """What the block holds and costs for an `in_side` x `in_side` input."""
        raise NotImplementedError

    @staticmethod
    def build(shape: BlockShape, activation: ActivationFactory) -> nn.Module:
        raise NotImplementedError

    @staticmethod
    def trace(tracer: Tracer, x: int, shape: BlockShape, in_side: int) -> int:
        """The block's operators on tensor `x` (`in_side` x `in_side`), as its deployable
        file runs them (spaces/memory.py); returns the block's output tensor."""
        raise NotImplementedError

    @staticmethod
    def widths(module: nn.Module) -> tuple[int, int, int]:
        """(hidden, out, squeeze) widths as the module holds them now, after any pruning."""
        raise NotImplementedError

    @staticmethod
    def fixed_in_global_pruning(module: nn.Module, depth: int) -> list[nn.Module]:
        """Layers whose output channels global pruning must leave alone, in a block of a
        stage of `depth` blocks: the config gives them one width, but torch-pruning sees
        separate channel groups, which global ranking would prune to different widths."""
        return []

    @staticmethod
    def whole_in_global_pruning(depth: int) -> tuple[bool, bool]:
        """(stage width, inner widths): whether global pruning leaves them whole in a
        stage of `depth` blocks, as `fixed_in_global_pruning` says in layers."""
        return False, False

    @classmethod
    def pruned(cls, shape: BlockShape, prune_ratio: float) -> BlockShape:
        """The shape torch-pruning leaves at `prune_ratio` (inner widths only; the stage's
        in and out widths are pruned with the whole network's channel groups)."""
        return BlockShape(
            kept_channels(shape.in_width, prune_ratio),
            kept_channels(shape.out_width, prune_ratio),
            kept_channels(shape.hidden_width, prune_ratio, shape.groups),
            shape.kernel_size,
            shape.stride,
            shape.projection,
            shape.groups,
            kept_channels(shape.squeeze_width, prune_ratio),
        )


BLOCKS: dict[str, type[Block]] = {}


def register_block(name: str) -> Callable[[type[Block]], type[Block]]:
    def register(cls: type[Block]) -> type[Block]:
        if name in BLOCKS:
            raise ValueError(f"block {name!r} is registered twice")
        BLOCKS[name] = cls
        return cls

    return register


def get_block(name: str) -> type[Block]:
    if name not in BLOCKS:
        raise ValueError(f"unknown block {name!r}; valid names: {', '.join(sorted(BLOCKS))}")
    return BLOCKS[name]


def _squeeze_excite(shape: BlockShape, channels: int, activation: ActivationFactory) -> list:
    from compsearch.spaces.layers import SqueezeExcite

    return [SqueezeExcite(channels, shape.squeeze_width, activation)] if shape.squeeze_width else []


def _squeeze_width(module: nn.Module) -> int:
    from compsearch.spaces.layers import SqueezeExcite

    for child in module.modules():
        if isinstance(child, SqueezeExcite):
            return child.reduce.out_channels
    return 0


@register_block("plain")
class PlainBlock(Block):
    """conv-BN-activation [-SE], no shortcut. `hidden_width` is unused and equals out_width."""

    @staticmethod
    def count(shape, in_side):
        side = out_resolution(in_side, shape.stride)
        counts = conv_bn_counts(shape.in_width, shape.out_width, shape.kernel_size, side)
        counts += LayerCounts(activations=1)
        return counts + squeeze_excite_counts(shape.out_width, shape.squeeze_width)

    @staticmethod
    def build(shape, activation):
        from torch import nn

        from compsearch.spaces.layers import conv_bn

        return nn.Sequential(
            conv_bn(shape.in_width, shape.out_width, shape.kernel_size, shape.stride),
            activation(),
            *_squeeze_excite(shape, shape.out_width, activation),
        )

    @staticmethod
    def trace(tracer, x, shape, in_side):
        side = out_resolution(in_side, shape.stride)
        out = shape.out_width
        y = tracer.conv(x, out, side, shape.kernel_size, shape.stride, shape.in_width, in_side)
        y = tracer.activation(y, out, side)
        return tracer.squeeze_excite(y, out, shape.squeeze_width, side)

    @staticmethod
    def widths(module):
        out = module[0][0].out_channels
        return out, out, _squeeze_width(module)

    @staticmethod
    def fixed_in_global_pruning(module, depth):
        # No shortcut ties the blocks of a stage, whose config gives them one width.
        return [module[0][0]] if depth > 1 else []

    @staticmethod
    def whole_in_global_pruning(depth):
        return depth > 1, depth > 1  # the inner width is the stage's


@register_block("basic")
class BasicBlock(Block):
    """ResNet basic block: k x k conv to `hidden_width`, k x k conv back [-SE], shortcut."""

    @staticmethod
    def count(shape, in_side):
        side = out_resolution(in_side, shape.stride)
        counts = conv_bn_counts(shape.in_width, shape.hidden_width, shape.kernel_size, side)
        counts += conv_bn_counts(shape.hidden_width, shape.out_width, shape.kernel_size, side)
        counts += squeeze_excite_counts(shape.out_width, shape.squeeze_width)
        if shape.projection:
            counts += conv_bn_counts(shape.in_width, shape.out_width, 1, side)
        return counts + LayerCounts(activations=2, additions=1)

    @staticmethod
    def build(shape, activation):
        from torch import nn

        from compsearch.spaces.layers import Residual, conv_bn

        _check_identity(shape)
        branch = nn.Sequential(
            conv_bn(shape.in_width, shape.hidden_width, shape.kernel_size, shape.stride),
            activation(),
            conv_bn(shape.hidden_width, shape.out_width, shape.kernel_size, 1),
            *_squeeze_excite(shape, shape.out_width, activation),
        )
        shortcut = conv_bn(shape.in_width, shape.out_width, 1, shape.stride)
        return Residual(branch, shortcut if shape.projection else None, activation())

    @staticmethod
    def trace(tracer, x, shape, in_side):
        side = out_resolution(in_side, shape.stride)
        hidden, out = shape.hidden_width, shape.out_width
        branch = tracer.conv(
            x, hidden, side, shape.kernel_size, shape.stride, shape.in_width, in_side
        )
        branch = tracer.activation(branch, hidden, side)
        branch = tracer.conv(branch, out, side)
        branch = tracer.squeeze_excite(branch, out, shape.squeeze_width, side)
        shortcut = tracer.conv(x, out, side) if shape.projection else x
        return tracer.activation(tracer.sum(branch, shortcut, out, side), out, side)

    @staticmethod
    def widths(module):
        return (
            module.branch[0][0].out_channels,
            module.branch[2][0].out_channels,
            (_squeeze_width(module)),
        )


@register_block("grouped")
class GroupedBlock(Block):
    """ResNeXt bottleneck: 1x1 conv to `hidden_width`, grouped k x k conv, 1x1 conv back
    [-SE], shortcut. `hidden_width` is a multiple of `groups`, at least two channels per
    group (with one, torch-pruning would take the convolution for a depthwise one)."""

    uses_groups = True

    @staticmethod
    def hidden_width(in_width, out_width, expansion, groups):
        return max(2 * groups, round(out_width / groups) * groups)

    @staticmethod
    def count(shape, in_side):
        side = out_resolution(in_side, shape.stride)
        hidden = shape.hidden_width
        counts = conv_bn_counts(shape.in_width, hidden, 1, in_side)
        counts += conv_bn_counts(hidden, hidden, shape.kernel_size, side, shape.groups)
        counts += conv_bn_counts(hidden, shape.out_width, 1, side)
        counts += squeeze_excite_counts(shape.out_width, shape.squeeze_width)
        if shape.projection:
            counts += conv_bn_counts(shape.in_width, shape.out_width, 1, side)
        return counts + LayerCounts(activations=3, additions=1)

    @staticmethod
    def build(shape, activation):
        from torch import nn

        from compsearch.spaces.layers import Residual, conv_bn

        _check_identity(shape)
        if shape.hidden_width % shape.groups:
            raise ValueError(
                "hidden_width % groups == 0 must hold, but got "
                f"(hidden_width={shape.hidden_width}, groups={shape.groups})"
            )
        hidden = shape.hidden_width
        branch = nn.Sequential(
            conv_bn(shape.in_width, hidden, 1, 1),
            activation(),
            conv_bn(hidden, hidden, shape.kernel_size, shape.stride, shape.groups),
            activation(),
            conv_bn(hidden, shape.out_width, 1, 1),
            *_squeeze_excite(shape, shape.out_width, activation),
        )
        shortcut = conv_bn(shape.in_width, shape.out_width, 1, shape.stride)
        return Residual(branch, shortcut if shape.projection else None, activation())

    @staticmethod
    def trace(tracer, x, shape, in_side):
        side = out_resolution(in_side, shape.stride)
        out = shape.out_width
        branch = tracer.conv(_expand_then_convolve(tracer, x, shape, in_side), out, side)
        branch = tracer.squeeze_excite(branch, out, shape.squeeze_width, side)
        shortcut = tracer.conv(x, out, side) if shape.projection else x
        return tracer.activation(tracer.sum(branch, shortcut, out, side), out, side)

    @staticmethod
    def widths(module):
        return (
            module.branch[0][0].out_channels,
            module.branch[4][0].out_channels,
            (_squeeze_width(module)),
        )

    @staticmethod
    def fixed_in_global_pruning(module, depth):
        # One hidden width for both sides of the grouped convolution.
        return [module.branch[0][0], module.branch[2][0]]

    @staticmethod
    def whole_in_global_pruning(depth):
        return False, True


@register_block("dwsep")
class DepthwiseSeparableBlock(Block):
    """MobileNet v1: depthwise k x k conv [-SE], then 1x1 conv to the output width.

    `hidden_width` is unused and equals out_width; SE gates the depthwise output.
    """

    @staticmethod
    def gated_width(shape):
        return shape.in_width

    @staticmethod
    def count(shape, in_side):
        side = out_resolution(in_side, shape.stride)
        width = shape.in_width
        counts = conv_bn_counts(width, width, shape.kernel_size, side, groups=width)
        counts += squeeze_excite_counts(width, shape.squeeze_width)
        counts += conv_bn_counts(width, shape.out_width, 1, side)
        return counts + LayerCounts(activations=2)

    @staticmethod
    def build(shape, activation):
        from torch import nn

        from compsearch.spaces.layers import conv_bn

        width = shape.in_width
        return nn.Sequential(
            conv_bn(width, width, shape.kernel_size, shape.stride, groups=width),
            activation(),
            *_squeeze_excite(shape, width, activation),
            conv_bn(width, shape.out_width, 1, 1),
            activation(),
        )

    @staticmethod
    def trace(tracer, x, shape, in_side):
        side = out_resolution(in_side, shape.stride)
        width, out = shape.in_width, shape.out_width
        y = tracer.conv(x, width, side, shape.kernel_size, shape.stride, width, in_side)
        y = tracer.activation(y, width, side)
        y = tracer.squeeze_excite(y, width, shape.squeeze_width, side)
        return tracer.activation(tracer.conv(y, out, side), out, side)

    @staticmethod
    def widths(module):
        out = module[-2][0].out_channels
        return out, out, _squeeze_width(module)

    @staticmethod
    def fixed_in_global_pruning(module, depth):
        # No shortcut ties the blocks of a stage, whose config gives them one width.
        return [module[-2][0]] if depth > 1 else []

    @staticmethod
    def whole_in_global_pruning(depth):
        return depth > 1, depth > 1  # the inner width is the stage's


@register_block("inverted")
class InvertedResidualBlock(Block):
    """MobileNet v2: 1x1 conv expanding to `hidden_width` (in_width x expansion), depthwise
    k x k conv [-SE], linear 1x1 conv to the output; an identity shortcut when the shapes
    allow one (`projection` False), none otherwise."""

    uses_expansion = True

    @staticmethod
    def hidden_width(in_width, out_width, expansion, groups):
        return max(1, round(in_width * expansion))

    @staticmethod
    def gated_width(shape):
        return shape.hidden_width

    @staticmethod
    def count(shape, in_side):
        side = out_resolution(in_side, shape.stride)
        hidden = shape.hidden_width
        counts = conv_bn_counts(shape.in_width, hidden, 1, in_side)
        counts += conv_bn_counts(hidden, hidden, shape.kernel_size, side, groups=hidden)
        counts += squeeze_excite_counts(hidden, shape.squeeze_width)
        counts += conv_bn_counts(hidden, shape.out_width, 1, side)
        counts += LayerCounts(activations=2)
        return counts if shape.projection else counts + LayerCounts(additions=1)

    @staticmethod
    def build(shape, activation):
        from torch import nn

        from compsearch.spaces.layers import Residual, conv_bn

        _check_identity(shape)
        hidden = shape.hidden_width
        branch = nn.Sequential(
            conv_bn(shape.in_width, hidden, 1, 1),
            activation(),
            conv_bn(hidden, hidden, shape.kernel_size, shape.stride, groups=hidden),
            activation(),
            *_squeeze_excite(shape, hidden, activation),
            conv_bn(hidden, shape.out_width, 1, 1),
        )
        return branch if shape.projection else Residual(branch, None, None)

    @staticmethod
    def trace(tracer, x, shape, in_side):
        side = out_resolution(in_side, shape.stride)
        branch = _expand_then_convolve(tracer, x, shape, in_side)
        branch = tracer.squeeze_excite(branch, shape.hidden_width, shape.squeeze_width, side)
        y = tracer.conv(branch, shape.out_width, side)
        return y if shape.projection else tracer.sum(y, x, shape.out_width, side)

    @staticmethod
    def widths(module):
        from compsearch.spaces.layers import Residual

        branch = module.branch if isinstance(module, Residual) else module
        return branch[0][0].out_channels, branch[-1][0].out_channels, _squeeze_width(module)


def _expand_then_convolve(tracer: Tracer, x: int, shape: BlockShape, in_side: int) -> int:
    """A 1x1 convolution to the hidden width, then the k x k one at the block's stride,
    each with its activation: how grouped and inverted blocks begin."""
    side = out_resolution(in_side, shape.stride)
    hidden = shape.hidden_width
    x = tracer.activation(tracer.conv(x, hidden, in_side), hidden, in_side)
    x = tracer.conv(x, hidden, side, shape.kernel_size, shape.stride, hidden, in_side)
    return tracer.activation(x, hidden, side)


def _check_identity(shape: BlockShape) -> None:
    if not shape.projection and (shape.stride != 1 or shape.in_width != shape.out_width):
        raise ValueError(
            "an identity shortcut needs stride 1 and in_width == out_width, but got "
            f"(stride={shape.stride}, in_width={shape.in_width}, out_width={shape.out_width})"
        )
