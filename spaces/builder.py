"""Turn an `ArchConfig` into an `nn.Module`."""

from __future__ import annotations

import torch
from torch import nn

from compsearch.spaces.blocks import get_block
from compsearch.spaces.config import ArchConfig, StageWidths, block_shapes
from compsearch.spaces.layers import conv_bn, make_activation


class Network(nn.Module):
    """Stem, stages of registered blocks, global average pool, linear classifier."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        activation = make_activation(arch.activation, arch.leaky_relu_slope)
        self.stem = nn.Sequential(
            conv_bn(arch.in_channels, arch.stem_width, arch.stem_kernel_size, 1),
            activation(),
        )
        self.blocks = nn.Sequential(
            *(
                get_block(stage.block).build(shape, activation)
                for stage, shape in block_shapes(arch)
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(arch.final_width, arch.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(x, 1))


def build(arch: ArchConfig) -> Network:
    return Network(arch)


def read_widths(model: Network, arch: ArchConfig) -> tuple[int, list[StageWidths]]:
    """The stem width and each stage's widths as the modules have them.

    Used after pruning, which changes the modules' channel counts in place.
    """
    stem_width = model.stem[0][0].out_channels
    blocks = iter(model.blocks)
    stages = []
    for stage in arch.stages:
        block = get_block(stage.block)
        widths = [block.widths(next(blocks)) for _ in range(stage.depth)]
        hidden = tuple(hidden for hidden, _, _ in widths)
        squeeze = tuple(squeeze for _, _, squeeze in widths) if stage.squeeze_widths else ()
        stages.append((widths[-1][1], hidden, squeeze))
    return stem_width, stages
