"""The builder against the analytic estimates, over many sampled configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import sampled_configs

from compsearch.objectives.compress import prune
from compsearch.objectives.measure import count_macs, count_params
from compsearch.spaces.builder import build
from compsearch.spaces.config import TrialConfig
from compsearch.spaces.estimate import channel_ratio, count_layers, estimate, pruned_arch
from compsearch.spaces.space import SearchSpace

SMALL = SearchSpace(
    in_channels=1, num_classes=10, test_resolution=8, width=(4, 48), stem_width=(4, 24)
)
COLOUR = SearchSpace(
    in_channels=3, num_classes=7, test_resolution=12, width=(4, 32), stem_width=(4, 16)
)


def test_analytic_params_equal_real_params_for_many_configs():
    configs = sampled_configs(SMALL, 150, seed=1) + sampled_configs(COLOUR, 150, seed=2)
    for config in configs:
        model = build(config.arch)
        assert count_layers(config.arch, config.train.test_resolution).params == count_params(model)


def test_output_shape_finite_and_gradients_for_sampled_configs():
    for config in sampled_configs(COLOUR, 15, seed=3):
        torch.manual_seed(0)
        model = build(config.arch)
        x = torch.randn(5, 3, 12, 12)
        y = model(x)
        assert y.shape == (5, 7)
        assert torch.isfinite(y).all()
        y.logsumexp(1).mean().backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def check_macs(configs):
    for config in configs:
        counts = count_layers(config.arch, 12)
        assert counts.macs == count_macs(build(config.arch), 3, 12)


def test_analytic_macs_equal_ptflops():
    check_macs(sampled_configs(COLOUR, 40, seed=4))


@pytest.mark.slow
def test_analytic_macs_equal_ptflops_for_hundreds_of_configs():
    check_macs(sampled_configs(COLOUR, 300, seed=40))


def test_pruning_removes_channels_as_estimated_and_rebuilds_from_config():
    check_pruning(sampled_configs(SMALL, 25, seed=5))


@pytest.mark.slow
def test_pruning_matches_the_estimate_for_hundreds_of_configs():
    check_pruning(sampled_configs(SMALL, 300, seed=50))


def check_pruning(configs):
    for config in configs:
        # Local magnitude pruning, for which the estimate is exact.
        compress = dataclasses.replace(config.compress, prune_criterion="l2", prune_scope="local")
        config = dataclasses.replace(config, compress=compress)
        torch.manual_seed(0)
        model = build(config.arch).eval()
        before = count_params(model)
        arch = prune(model, config.arch, compress, torch.zeros(1, 1, 8, 8))
        assert arch == pruned_arch(config.arch, channel_ratio(config.arch, compress.prune_fraction))
        assert count_params(model) == estimate(config).params
        if compress.prune_fraction > 0:
            assert count_params(model) < before
        rebuilt = build(arch).eval()
        rebuilt.load_state_dict(model.state_dict())
        x = torch.randn(2, 1, 8, 8)
        torch.testing.assert_close(rebuilt(x), model(x))


def test_config_round_trips_through_a_dict():
    for config in sampled_configs(COLOUR, 10, seed=6):
        assert TrialConfig.from_dict(config.to_dict()) == config
