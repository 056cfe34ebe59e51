"""Activations and blocks by name.

A block type is one class and one `@register_block` line. Each class also states its
parameter and MAC counts analytically, so budgets are checked before anything is built;
the contract tests hold the formulas to the real modules.

MACs follow ptflops' aten backend: a convolution costs out_elements * in/groups * k * k.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import astuple, dataclass

import torch
from torch import nn

ActivationFactory = Callable[[], nn.Module]


def make_activation(name: str, leaky_relu_slope: float = 0.01) -> ActivationFactory:
    factories: dict[str, ActivationFactory] = {
        "relu": lambda: nn.ReLU(inplace=True),
        "leaky_relu": lambda: nn.LeakyReLU(leaky_relu_slope, inplace=True),
        "silu": lambda: nn.SiLU(inplace=True),
        "hardswish": lambda: nn.Hardswish(inplace=True),
    }
    if name not in factories:
        raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(factories)}")
    return factories[name]


ACTIVATIONS = ("relu", "leaky_relu", "silu", "hardswish")


@dataclass(frozen=True)
class LayerCounts:
    """What a part of a network holds and costs, counted from its shapes."""

    params: int = 0
    macs: int = 0  # per image
    batchnorm_channels: int = 0  # folded into convolution biases by ONNX export
    convolutions: int = 0
    activations: int = 0
    additions: int = 0  # residual sums

    def __add__(self, other: LayerCounts) -> LayerCounts:
        return LayerCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


def conv_bn_counts(in_width: int, out_width: int, kernel_size: int, out_side: int) -> LayerCounts:
    """A bias-free convolution followed by a batch norm."""
    return LayerCounts(
        params=in_width * out_width * kernel_size * kernel_size + 2 * out_width,
        macs=out_side * out_side * out_width * in_width * kernel_size * kernel_size,
        batchnorm_channels=out_width,
        convolutions=1,
    )


def out_resolution(resolution: int, stride: int) -> int:
    """Side of the output of a convolution with padding k // 2 (odd k)."""
    return math.ceil(resolution / stride)


def conv_bn(in_width: int, out_width: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_width, out_width, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_width),
    )


class Block(nn.Module):
    """Interface of a block: constructor arguments and analytic counts.

    `hidden_width` is the block's inner width (the channels pruning may remove without
    touching the stage's output); `projection` asks for a 1x1 shortcut projection.
    """

    def __init__(
        self,
        in_width: int,
        out_width: int,
        hidden_width: int,
        kernel_size: int,
        stride: int,
        projection: bool,
        activation: ActivationFactory,
    ) -> None:
        super().__init__()

    def widths(self) -> tuple[int, int]:
        """(hidden width, out width) as the modules hold them now, after any pruning."""
        raise NotImplementedError

    @staticmethod
    def count(
        in_width: int,
        out_width: int,
        hidden_width: int,
        kernel_size: int,
        stride: int,
        projection: bool,
        in_side: int,
    ) -> LayerCounts:
        """What the block holds and costs for an `in_side` x `in_side` input."""
        raise NotImplementedError


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


@register_block("basic")
class BasicBlock(Block):
    """ResNet basic block: two k x k convolutions and a shortcut."""

    def __init__(
        self,
        in_width: int,
        out_width: int,
        hidden_width: int,
        kernel_size: int,
        stride: int,
        projection: bool,
        activation: ActivationFactory,
    ) -> None:
        super().__init__(
            in_width, out_width, hidden_width, kernel_size, stride, projection, activation
        )
        if not projection and (stride != 1 or in_width != out_width):
            raise ValueError(
                "an identity shortcut needs stride 1 and in_width == out_width, but got "
                f"(stride={stride}, in_width={in_width}, out_width={out_width})"
            )
        self.conv1 = conv_bn(in_width, hidden_width, kernel_size, stride)
        self.act1 = activation()
        self.conv2 = conv_bn(hidden_width, out_width, kernel_size, 1)
        self.shortcut = conv_bn(in_width, out_width, 1, stride) if projection else nn.Identity()
        self.act2 = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.conv2(self.act1(self.conv1(x))) + self.shortcut(x))

    def widths(self) -> tuple[int, int]:
        return self.conv1[0].out_channels, self.conv2[0].out_channels

    @staticmethod
    def count(in_width, out_width, hidden_width, kernel_size, stride, projection, in_side):
        side = out_resolution(in_side, stride)
        counts = conv_bn_counts(in_width, hidden_width, kernel_size, side)
        counts += conv_bn_counts(hidden_width, out_width, kernel_size, side)
        if projection:
            counts += conv_bn_counts(in_width, out_width, 1, side)
        return counts + LayerCounts(activations=2, additions=1)


@register_block("plain")
class PlainBlock(Block):
    """conv-BN-activation, no shortcut; `hidden_width` is unused and must equal out_width."""

    def __init__(
        self,
        in_width: int,
        out_width: int,
        hidden_width: int,
        kernel_size: int,
        stride: int,
        projection: bool,
        activation: ActivationFactory,
    ) -> None:
        super().__init__(
            in_width, out_width, hidden_width, kernel_size, stride, projection, activation
        )
        self.conv = conv_bn(in_width, out_width, kernel_size, stride)
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))

    def widths(self) -> tuple[int, int]:
        return self.conv[0].out_channels, self.conv[0].out_channels

    @staticmethod
    def count(in_width, out_width, hidden_width, kernel_size, stride, projection, in_side):
        side = out_resolution(in_side, stride)
        return conv_bn_counts(in_width, out_width, kernel_size, side) + LayerCounts(activations=1)
