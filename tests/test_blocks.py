"""Contract tests run for every registered block: a new block is tested once registered."""

from __future__ import annotations

import pytest
import torch

from compsearch.objectives.measure import count_macs, count_params
from compsearch.spaces.blocks import BLOCKS, get_block, make_activation

# (in_width, out_width, hidden_width, kernel_size, stride, projection)
SHAPES = [
    (8, 8, 8, 3, 1, False),
    (8, 16, 12, 3, 2, True),
    (6, 6, 4, 5, 1, False),
    (4, 10, 10, 5, 2, True),
    (12, 12, 7, 3, 1, True),
]


def make(name, shape, activation="silu"):
    in_width, out_width, hidden, kernel, stride, projection = shape
    if name == "plain":
        hidden = out_width
        if not projection and (in_width != out_width or stride != 1):
            pytest.skip("not a valid plain shape")
    return get_block(name)(
        in_width, out_width, hidden, kernel, stride, projection, make_activation(activation)
    ), (in_width, out_width, hidden, kernel, stride, projection)


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("shape", SHAPES)
def test_output_shape_and_finite(name, shape):
    torch.manual_seed(0)
    block, (in_width, out_width, _, _, stride, _) = make(name, shape)
    x = torch.randn(3, in_width, 9, 9)
    y = block(x)
    side = -(-9 // stride)
    assert y.shape == (3, out_width, side, side)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("shape", SHAPES)
def test_every_parameter_gets_a_gradient(name, shape):
    torch.manual_seed(0)
    block, (in_width, *_rest) = make(name, shape)
    block(torch.randn(4, in_width, 8, 8)).square().mean().backward()
    for parameter_name, parameter in block.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("shape", SHAPES)
def test_analytic_counts_equal_real_ones(name, shape):
    block, shape = make(name, shape)
    counts = get_block(name).count(*shape, 8)
    assert counts.params == count_params(block)
    assert counts.macs == count_macs(block, shape[0], 8)
    assert block.widths() == (shape[2], shape[1])


def test_unknown_block_lists_the_valid_names():
    with pytest.raises(ValueError, match="valid names: basic, plain"):
        get_block("resnext")


def test_unknown_activation_lists_the_valid_names():
    with pytest.raises(ValueError, match="relu, leaky_relu, silu, hardswish"):
        make_activation("gelu")
