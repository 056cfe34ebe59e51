"""The search space: its file form, its scaling with the data, and its extremes."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import sampled_configs

from compsearch.spaces.estimate import estimate, extreme_estimate
from compsearch.spaces.space import SearchSpace, SpaceError, load_space, space_for

DIGITS = space_for(1, 10, 8)


def write(tmp_path, text: str):
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_a_space_file_narrows_what_is_sampled(tmp_path):
    path = write(
        tmp_path,
        'blocks = ["inverted", "dwsep"]\nwidth = [8, 16]\nprecisions = ["int8"]\n'
        'activations = ["hardswish"]\nsqueeze_excitation = [true]\nstages = 2\n',
    )
    space = load_space(path, DIGITS)
    for config in sampled_configs(space, 40, seed=0):
        assert len(config.arch.stages) == 2
        assert config.compress.precision == "int8"
        assert config.arch.activation == "hardswish"
        for stage in config.arch.stages:
            assert stage.block in ("inverted", "dwsep")
            assert 8 <= stage.width <= 16
            assert len(stage.squeeze_widths) == stage.depth


def test_a_space_file_widens_a_range(tmp_path):
    space = load_space(write(tmp_path, "width = [4, 512]\ndepth = [1, 6]\n"), DIGITS)
    widths = [s.width for c in sampled_configs(space, 60, seed=1) for s in c.arch.stages]
    assert max(widths) > DIGITS.width[1] and min(widths) < DIGITS.width[0]


def test_the_written_space_reads_back_as_the_same_space(tmp_path):
    space = dataclasses.replace(DIGITS, blocks=("basic", "grouped"), prune_fraction=(0.1, 0.7))
    assert load_space(write(tmp_path, space.to_toml()), DIGITS) == space


def test_every_problem_in_a_space_file_is_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        'widht = [8, 16]\nblocks = ["basic", "resnext"]\nnum_classes = 3\ndepth = [3, 1]\n',
    )
    with pytest.raises(SpaceError) as caught:
        load_space(path, DIGITS)
    message = str(caught.value)
    assert "\n" not in message
    assert "unknown field 'widht'" in message and "width" in message
    assert "num_classes is fixed by the dataset" in message
    # Fields are checked together once the names are right.
    path = write(tmp_path, 'blocks = ["basic", "resnext"]\ndepth = [3, 1]\nkernel_sizes = [4]\n')
    with pytest.raises(SpaceError) as caught:
        load_space(path, DIGITS)
    message = str(caught.value)
    for fragment in ("unknown 'resnext'", "depth: 1 <= low <= high", "kernel_sizes must be odd"):
        assert fragment in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("width = [8, 16", "not valid TOML"),
        ('blocks = "basic"', "blocks must be a list"),
        ("width = [8]", "width must be [low, high]"),
        ("prune_fraction = [0.0, 1.0]", "prune_fraction: 0 <= low <= high <= 0.9"),
        ('prune_criteria = ["l1"]', "prune_criteria: unknown 'l1'"),
        ("precisions = []", "precisions needs at least one choice"),
        ("train_resolutions = [16]", "train_resolutions must be <= the test resolution 8"),
    ],
)
def test_malformed_space_files_say_what_is_wrong(tmp_path, text, fragment):
    with pytest.raises(SpaceError, match=fragment.replace("[", r"\[")):
        load_space(write(tmp_path, text), DIGITS)


def test_missing_space_file(tmp_path):
    with pytest.raises(SpaceError, match="cannot read space file"):
        load_space(tmp_path / "absent.toml", DIGITS)


def test_ranges_scale_with_the_input_size_and_class_count():
    cifar100 = space_for(3, 100, 32)
    stl10 = space_for(3, 10, 96)
    assert cifar100.width[1] > DIGITS.width[1] and cifar100.width[0] > DIGITS.width[0]
    assert stl10.stages > DIGITS.stages and stl10.width[1] > DIGITS.width[1]
    assert stl10.train_resolutions == (48, 72, 96)
    assert DIGITS.train_resolutions == (4, 6, 8)


@pytest.mark.parametrize(
    "space",
    [
        DIGITS,
        space_for(3, 10, 32),
        SearchSpace(1, 10, 8, blocks=("dwsep", "grouped"), prune_fraction=(0.2, 0.6)),
    ],
)
def test_every_sampled_config_lies_between_the_space_extremes(space):
    smallest = extreme_estimate(space, smallest=True)
    largest = extreme_estimate(space, smallest=False)
    for config in sampled_configs(space, 300, seed=3):
        expected = estimate(config)
        assert smallest.params <= expected.params <= largest.params
        assert smallest.file_bytes <= expected.file_bytes <= largest.file_bytes
        assert smallest.macs <= expected.macs <= largest.macs
        assert smallest.ram_bytes <= expected.ram_bytes <= largest.ram_bytes


def test_a_space_of_one_config_has_that_config_as_both_extremes():
    space = SearchSpace(
        1,
        10,
        8,
        stem_width=(12, 12),
        depth=(2, 2),
        width=(20, 20),
        kernel_sizes=(3,),
        strides=(2,),
        blocks=("inverted",),
        expansions=(4,),
        squeeze_excitation=(True,),
        activations=("silu",),
        train_resolutions=(8,),
        precisions=("int8",),
        prune_fraction=(0.0, 0.0),
    )
    (config,) = sampled_configs(space, 1, seed=0)
    expected = estimate(config)
    for smallest in (True, False):
        extreme = extreme_estimate(space, smallest)
        assert dataclasses.replace(extreme, ram_bytes=0) == dataclasses.replace(
            expected, ram_bytes=0
        )
    # Peak memory has bounds only (spaces/estimate.py, ram_bound).
    assert extreme_estimate(space, True).ram_bytes <= expected.ram_bytes
    assert expected.ram_bytes <= extreme_estimate(space, False).ram_bytes
