"""Contract tests run for every registered block: a new block is tested once registered."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compsearch.objectives.compress import prune
from compsearch.objectives.measure import count_macs, count_params
from compsearch.spaces.blocks import (
    BLOCKS,
    BlockShape,
    get_block,
    kept_channels,
    squeeze_width_for,
)
from compsearch.spaces.builder import build
from compsearch.spaces.config import ArchConfig, CompressConfig, block_shapes
from compsearch.spaces.estimate import (
    channel_ratio,
    count_layers,
    global_pruned_arch,
    pruned_arch,
)
from compsearch.spaces.layers import make_activation
from compsearch.spaces.space import make_stage

# (in_width, out_width, kernel_size, stride, projection, expansion, groups, squeeze-excite)
OPTIONS = [
    (8, 8, 3, 1, False, 2, 2, False),
    (8, 16, 3, 2, True, 4, 4, True),
    (6, 6, 5, 1, False, 3, 2, True),
    (4, 10, 5, 2, True, 6, 2, False),
    (12, 12, 3, 1, True, 1, 4, True),
]


def shape_for(name: str, options: tuple) -> BlockShape:
    in_width, out_width, kernel, stride, projection, expansion, groups, se = options
    block = get_block(name)
    groups = groups if block.uses_groups else 1
    hidden = block.hidden_width(in_width, out_width, expansion, groups)
    shape = BlockShape(in_width, out_width, hidden, kernel, stride, projection, groups)
    if se:
        shape = dataclasses.replace(
            shape, squeeze_width=squeeze_width_for(block.gated_width(shape))
        )
    return shape


def make(name: str, options: tuple, activation: str = "silu"):
    shape = shape_for(name, options)
    return get_block(name).build(shape, make_activation(activation)), shape


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("options", OPTIONS)
def test_output_shape_and_finite(name, options):
    torch.manual_seed(0)
    block, shape = make(name, options)
    y = block(torch.randn(3, shape.in_width, 9, 9))
    side = -(-9 // shape.stride)
    assert y.shape == (3, shape.out_width, side, side)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("options", OPTIONS)
def test_every_parameter_gets_a_gradient(name, options):
    torch.manual_seed(0)
    block, shape = make(name, options)
    block(torch.randn(4, shape.in_width, 8, 8)).square().mean().backward()
    for parameter_name, parameter in block.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("options", OPTIONS)
def test_analytic_counts_equal_real_ones(name, options):
    block, shape = make(name, options)
    counts = get_block(name).count(shape, 8)
    assert counts.params == count_params(block)
    assert counts.macs == count_macs(block, shape.in_width, 8)
    assert get_block(name).widths(block) == (
        shape.hidden_width,
        shape.out_width,
        shape.squeeze_width,
    )


def random_loss(model: torch.nn.Module) -> torch.Tensor:
    """A loss on random images and labels: gradients for Taylor pruning."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 5, (16,), generator=generator)
    return torch.nn.functional.cross_entropy(model(x), labels)


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("squeeze_excitation", [False, True])
@pytest.mark.parametrize(
    ("fraction", "criterion", "scope"),
    [
        (0.3, "l2", "local"),
        (0.5, "bn_scale", "local"),
        (0.5, "taylor", "local"),
        (0.5, "l2", "global"),
    ],
)
def test_pruning_keeps_the_block_valid(name, squeeze_excitation, fraction, criterion, scope):
    """Pruned inside a network: at least `fraction` of the params gone (exactly as
    estimated when local), and it rebuilds from its config."""
    stage = make_stage(name, 2, 12, 16, 3, 2, 4, 4, squeeze_excitation)
    arch = ArchConfig(3, 5, 12, 3, "relu", 0.1, stages=(stage,))
    torch.manual_seed(0)
    model = build(arch).eval()
    for norm in model.modules():  # distinct batch-norm scales, as after training
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.weight.data.uniform_(0.5, 1.5)
    before = count_params(model)
    compress = CompressConfig("fp32", fraction, criterion, scope)
    pruned = prune(model, arch, compress, torch.zeros(1, 3, 8, 8), random_loss)
    assert count_params(model) == count_layers(pruned, 8).params
    if scope == "local":
        assert pruned == pruned_arch(arch, channel_ratio(arch, fraction))
    if scope == "local" or name not in ("plain", "dwsep", "grouped"):
        assert count_params(model) <= (1 - fraction) * before
    else:  # global pruning leaves whole what `fixed_in_global_pruning` names: here, most
        assert count_params(model) < before
    x = torch.randn(2, 3, 8, 8)
    assert torch.isfinite(model(x)).all()
    rebuilt = build(pruned).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.parametrize("name", sorted(BLOCKS))
@pytest.mark.parametrize("fraction", [0.3, 0.7])
def test_the_global_pruning_estimate_keeps_whole_what_global_pruning_cannot_thin(name, fraction):
    """Two stages of two blocks, pruned globally: the widths `whole_in_global_pruning`
    names are the widths pruning left, and the parameters come within 10% of what it
    left (local pruning at the share is far under for plain blocks, whose stages global
    pruning cannot thin at all)."""
    stages = tuple(
        make_stage(name, 2, in_width, width, 3, 2, 4, 4, False)
        for in_width, width in ((12, 16), (16, 32))
    )
    arch = ArchConfig(3, 5, 12, 3, "relu", 0.1, stages=stages)
    torch.manual_seed(0)
    model = build(arch).eval()
    for norm in model.modules():  # distinct batch-norm scales, as after training
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.weight.data.uniform_(0.5, 1.5)
    left = prune(
        model, arch, CompressConfig("fp32", fraction, "l2", "global"), torch.zeros(1, 3, 8, 8)
    )
    expected = global_pruned_arch(arch, fraction)
    whole_width, whole_inner = get_block(name).whole_in_global_pruning(2)
    for stage, estimated, original in zip(left.stages, expected.stages, arch.stages, strict=True):
        if whole_width:
            assert stage.width == estimated.width == original.width
        if whole_inner:
            assert stage.hidden_widths == estimated.hidden_widths == original.hidden_widths
    real = count_params(model)
    assert abs(count_layers(expected, 1).params / real - 1) <= 0.10


def test_kept_channels_follows_torch_pruning_rules():
    assert kept_channels(64, 0.1) == 57  # int(57.6)
    assert kept_channels(24, 0.1, groups=4) == 20  # int(6 * 0.9) per group
    assert kept_channels(1, 0.5) == 1  # a single channel is never pruned
    assert kept_channels(3, 0.7) == 3  # a group pruned to nothing is left alone
    assert kept_channels(10, 0.0) == 10


@pytest.fixture
def aligned(monkeypatch):
    """Pruned widths rounded down to multiples of 8, as `--alignment 8` benchmarks them."""
    monkeypatch.setattr("compsearch.spaces.blocks.CHANNEL_ALIGNMENT", 8)


def test_kept_channels_then_aligns_where_asked(aligned):
    assert kept_channels(64, 0.1) == 56  # int(57.6), down to a multiple of 8
    assert kept_channels(64, 0.5) == 32
    assert kept_channels(12, 0.3) == 8  # int(8.4)
    assert kept_channels(12, 0.5) == 6  # at most 8: as torch-pruning leaves it
    assert kept_channels(24, 0.1, groups=4) == 20  # int(6 * 0.9) per group, not aligned


def test_pruning_leaves_widths_that_are_multiples_of_8(aligned):
    """Local and global pruning of a network of odd widths: every width above 8 that no
    grouped convolution splits is a multiple of 8 afterwards, the least important channels
    went, and the pruned model still computes."""
    stages = (
        make_stage("basic", 1, 13, 21, 3, 1, 4, 4, False),
        make_stage("inverted", 2, 21, 45, 3, 2, 4, 4, True),
        make_stage("grouped", 1, 45, 36, 3, 2, 2, 4, False),
    )
    arch = ArchConfig(3, 5, 13, 3, "relu", 0.1, stages=stages)
    for scope in ("local", "global"):
        torch.manual_seed(0)
        model = build(arch).eval()
        compress = CompressConfig("fp32", 0.3, "l2", scope)
        pruned = prune(model, arch, compress, torch.zeros(1, 3, 16, 16))
        widths = [pruned.stem_width]
        for stage, shape in block_shapes(pruned):
            widths += [shape.out_width, shape.squeeze_width]
            if stage.block != "grouped":
                widths.append(shape.hidden_width)
        assert all(w <= 8 or w % 8 == 0 for w in widths), (scope, widths)
        assert torch.isfinite(model(torch.randn(2, 3, 16, 16))).all()
        if scope == "local":
            assert pruned == pruned_arch(arch, channel_ratio(arch, 0.3))


def test_aligning_removes_the_least_important_channels(aligned):
    """Of a 13-channel stem, the 5 channels with the smallest weights go."""
    from compsearch.objectives.compress import align_channels, importance

    arch = ArchConfig(
        3, 5, 13, 3, "relu", 0.1, stages=(make_stage("plain", 1, 13, 8, 3, 1, 1, 4, False),)
    )
    torch.manual_seed(0)
    model = build(arch).eval()
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    norms = [1.0 + c for c in range(13)]
    weak = [2, 5, 7, 11, 12]
    with torch.no_grad():
        for c in range(13):
            scale = 0.01 if c in weak else norms[c]
            stem.weight[c] = scale / stem.weight[c].norm() * stem.weight[c]
    kept = [stem.weight[c].clone() for c in range(13) if c not in weak]
    align_channels(model, torch.zeros(1, 3, 8, 8), importance("l2"), [model.classifier])
    assert stem.out_channels == 8
    for row, expected in zip(stem.weight, kept, strict=True):
        torch.testing.assert_close(row, expected)


def test_unknown_block_lists_the_valid_names():
    with pytest.raises(ValueError, match="valid names: basic, dwsep, grouped, inverted, plain"):
        get_block("resnext")


def test_unknown_activation_lists_the_valid_names():
    with pytest.raises(ValueError, match="relu, leaky_relu, silu, hardswish"):
        make_activation("gelu")
