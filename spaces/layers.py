"""The torch layers blocks are made of: activations by name, conv-BN, residual sums and
squeeze-and-excitation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
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


class StridedPointwise(nn.Conv2d):
    """A 1x1 convolution with a stride, which takes gradients on the CPU as subsampling
    then a stride-1 convolution: the same function. oneDNN's kernel for the weight
    gradient of a strided 1x1 convolution on channels_last input of fewer input channels
    than its vector block (8 with AVX2, 16 with AVX-512) writes past its workspace
    (oneDNN issue 6035, torch 2.13): the process hangs, segfaults or aborts on a
    corrupted heap. Pruning leaves such widths, and Taylor pruning takes gradients with
    the model in eval mode, so the detour is taken whenever gradients are, in training
    or not. Without gradients, and so in the exported file, it is the plain strided
    convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exporting = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
        if exporting or not torch.is_grad_enabled() or x.device.type != "cpu":
            return super().forward(x)
        step_y, step_x = self.stride
        subsampled = x[:, :, ::step_y, ::step_x]
        return F.conv2d(subsampled, self.weight, self.bias, 1, 0, self.dilation, self.groups)


def conv_bn(
    in_width: int, out_width: int, kernel_size: int, stride: int, groups: int = 1
) -> nn.Sequential:
    conv = StridedPointwise if kernel_size == 1 and stride > 1 else nn.Conv2d
    return nn.Sequential(
        conv(
            in_width,
            out_width,
            kernel_size,
            stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_width),
    )


class Residual(nn.Module):
    """after(branch(x) + shortcut(x)); no shortcut module means the identity."""

    def __init__(
        self, branch: nn.Module, shortcut: nn.Module | None, after: nn.Module | None
    ) -> None:
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.after = after if after is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.branch(x) + self.shortcut(x))


class SqueezeExcite(nn.Module):
    """Channel gates from the globally pooled input (Hu et al., 2018)."""

    def __init__(self, channels: int, squeeze_width: int, activation: ActivationFactory) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze_width, 1)
        self.act = activation()
        self.expand = nn.Conv2d(squeeze_width, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))
