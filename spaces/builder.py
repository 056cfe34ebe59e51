"""Turn an `ArchConfig` into an `nn.Module`."""

from __future__ import annotations

import torch
from torch import nn

from compsearch.spaces.blocks import conv_bn, get_block, make_activation
from compsearch.spaces.config import ArchConfig


class Network(nn.Module):
    """Stem, stages of registered blocks, global average pool, linear classifier."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        activation = make_activation(arch.activation, arch.leaky_relu_slope)
        self.stem = nn.Sequential(
            conv_bn(arch.in_channels, arch.stem_width, arch.stem_kernel_size, 1),
            activation(),
        )
        blocks: list[nn.Module] = []
        in_width = arch.stem_width
        for stage in arch.stages:
            block_class = get_block(stage.block)
            for index in range(stage.depth):
                first = index == 0
                blocks.append(
                    block_class(
                        in_width=in_width,
                        out_width=stage.width,
                        hidden_width=stage.hidden_widths[index],
                        kernel_size=stage.kernel_size,
                        stride=stage.stride if first else 1,
                        projection=stage.projection and first,
                        activation=activation,
                    )
                )
                in_width = stage.width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_width, arch.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(x, 1))


def build(arch: ArchConfig) -> Network:
    return Network(arch)


def read_widths(model: Network, arch: ArchConfig) -> tuple[int, list[tuple[int, tuple[int, ...]]]]:
    """The stem width and each stage's (width, hidden widths) as the modules have them.

    Used after pruning, which changes the modules' channel counts in place.
    """
    stem_width = model.stem[0][0].out_channels
    blocks = iter(model.blocks)
    stages = []
    for stage in arch.stages:
        stage_blocks = [next(blocks) for _ in range(stage.depth)]
        hidden = tuple(block.widths()[0] for block in stage_blocks)
        stages.append((stage_blocks[-1].widths()[1], hidden))
    return stem_width, stages
