"""Known architectures as a new study's first trials (search/anchors.py)."""

from __future__ import annotations

import optuna
import pytest
from conftest import SCHEDULE

import compsearch
from compsearch.results.records import read_trials, retry_attrs
from compsearch.search.anchors import ANCHORS, anchor_params, queue_anchors
from compsearch.search.options import RunOptions
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.builder import build
from compsearch.spaces.estimate import estimate
from compsearch.spaces.space import sample, space_for

LOOSE = Budgets(params=2e6, size_kb=3000)


def config_of(name: str, space):
    return sample(optuna.trial.FixedTrial(anchor_params(ANCHORS[name], space)), space, SCHEDULE)


@pytest.mark.parametrize("shape", [(1, 10, 8), (1, 10, 28), (3, 10, 32), (3, 100, 32), (3, 10, 96)])
def test_every_anchor_is_expressed_in_the_default_space_of_every_dataset(shape):
    space = space_for(*shape)
    for name in ANCHORS:
        assert anchor_params(ANCHORS[name], space) is not None, name


def test_resnet8_and_resnet20_are_the_networks_of_their_papers():
    """On CIFAR-10's space: basic blocks of 16, 32 and 64 channels, one or three per stage,
    the parameter counts of the known networks (ResNet-8 of MLPerf Tiny: about 78k;
    ResNet-20: about 0.27M), int8, unpruned, trained at the test resolution."""
    space = space_for(3, 10, 32)
    for name, depth, low, high in (
        ("resnet8", 1, 74_000, 82_000),
        ("resnet20", 3, 260_000, 280_000),
    ):
        config = config_of(name, space)
        assert [(s.block, s.depth, s.width, s.stride) for s in config.arch.stages] == [
            ("basic", depth, 16, 1), ("basic", depth, 32, 2), ("basic", depth, 64, 2)
        ]  # fmt: skip
        params = sum(p.numel() for p in build(config.arch).parameters())
        assert low <= params <= high, (name, params)
        assert config.compress.precision == "int8" and config.compress.prune_fraction == 0
        assert config.train.train_resolution == config.train.test_resolution == 32


def test_anchors_are_queued_once_in_order_and_shrunk_to_tight_budgets():
    space = space_for(1, 10, 8)
    study = optuna.create_study(directions=["maximize", "minimize"])
    assert queue_anchors(study, space, SCHEDULE, LOOSE, say=print) == list(ANCHORS)
    assert [r.anchor for r in read_trials(study.trials)] == list(ANCHORS)
    assert all(t.state.name == "WAITING" for t in study.trials)
    assert queue_anchors(study, space, SCHEDULE, LOOSE, say=print) == []  # already there

    tight = Budgets(params=20_000, size_kb=30)
    lines = []
    study = optuna.create_study(directions=["maximize", "minimize"])
    queued = queue_anchors(study, space, SCHEDULE, tight, say=lines.append)
    assert "resnet20 (narrowed to fit)" in queued
    for _ in queued:  # each asked as the search asks it: the queued params, suggested
        trial = study.ask()
        expected = estimate(sample(trial, space, SCHEDULE))
        assert trial.user_attrs["anchor"] in ANCHORS
        assert not tight.excess(
            expected.params, expected.size_kb, expected.macs, expected.ram_kb
        ), trial.params


def test_an_anchor_the_space_cannot_express_is_left_out_and_said():
    space = space_for(1, 10, 8)
    space = type(space)(**{**space.__dict__, "blocks": ("dwsep", "inverted")})
    lines = []
    study = optuna.create_study(directions=["maximize", "minimize"])
    assert queue_anchors(study, space, SCHEDULE, LOOSE, say=lines.append) == [
        "mobilenetv2",
        "dscnn",
    ]
    assert "resnet8 (the space cannot express it)" in lines[-1]


def test_a_retried_anchor_keeps_its_name():
    trial = optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, user_attrs={"anchor": "resnet8", "reason": "x"}
    )
    assert retry_attrs(trial)["anchor"] == "resnet8"


def test_no_anchors_leaves_them_out_and_reaches_the_workers(tmp_path):
    summary = compsearch.run(
        50e3, 50, trials=1, epochs=2, subset=200, device="cpu", anchors=False, out=tmp_path,
        quiet=True,
    )  # fmt: skip
    assert summary.counts.trained == 1
    assert all(record.anchor == "" for record in summary.view.records)
    assert "--no-anchors" in RunOptions(2e6, 300, anchors=False).to_argv()


def test_queued_anchors_are_not_counted_as_interrupted_trials():
    from compsearch.search.loop import waiting_trials
    from compsearch.search.study import Retry

    study = optuna.create_study(directions=["maximize", "minimize"])
    queue_anchors(study, space_for(1, 10, 8), SCHEDULE, LOOSE, say=print)
    assert waiting_trials(study) == 0
    trial = study.ask()
    trial.suggest_int("x", 0, 1)
    Retry()(study, study.tell(trial, state=optuna.trial.TrialState.FAIL))
    assert waiting_trials(study) == 1
