"""Latency: the file's measured median, the model that predicts it from a config, and a
search under --budget-latency."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import optuna
import pytest
from conftest import SCHEDULE

from compsearch.objectives.compress import export
from compsearch.objectives.data import load_dataset
from compsearch.objectives.latency import file_latency_ms
from compsearch.objectives.teacher import residual_arch
from compsearch.results.records import read_trials
from compsearch.search import latency as latency_module
from compsearch.search.latency import (
    LATENCY_MARGIN,
    LATENCY_SLACK,
    LatencyModel,
    calibrate_latency,
)
from compsearch.search.loop import SearchSettings, search
from compsearch.search.study import DIRECTIONS
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.builder import build
from compsearch.spaces.cost import latency_features
from compsearch.spaces.space import sample, space_for

SPACE = space_for(1, 10, 8)


def test_a_file_s_latency_is_the_median_of_timed_runs_and_grows_with_its_work(tmp_path):
    """ResNet-20 at 32 px does about 100 times the MACs of a ResNet-8 4-8-16 at 8 px."""
    small = export(
        build(residual_arch(1, 10, (4, 8, 16), 1)).eval(), "fp32", 8, 1, tmp_path / "small.onnx"
    )
    large = export(
        build(residual_arch(3, 10, (16, 32, 64), 3)).eval(), "fp32", 32, 3, tmp_path / "l.onnx"
    )
    fast, slow = file_latency_ms(small, 1, 8), file_latency_ms(large, 3, 32)
    assert 0 < fast < slow and math.isfinite(slow)


def test_the_latency_model_recovers_linear_costs_and_lowers_its_prediction_by_its_error():
    configs = [sample(optuna.trial.FixedTrial(p), SPACE, SCHEDULE) for p in params(6)]
    weights = (2e-6, 1e-5, 0.01, 0.05)  # ms per MAC, per value, per node, per run
    rows = [(latency_features(c), float(np.dot(weights, latency_features(c)))) for c in configs]
    model = LatencyModel.fit({"int8": rows})
    assert model.worst_error < 1e-6
    int8 = [c for c in configs if c.compress.precision == "int8"]
    for config in int8:
        assert model.predict(config) == pytest.approx(np.dot(weights, latency_features(config)))
        assert model.optimistic(config) == pytest.approx(model.predict(config) / LATENCY_SLACK)
    sloppy = dataclasses.replace(model, worst_error=10.0)  # then the error sets the slack
    assert sloppy.optimistic(int8[0]) == pytest.approx(
        model.predict(int8[0]) / (11.0 + LATENCY_MARGIN)
    )


def params(count: int) -> list[dict]:
    """The parameters of `count` random int8 configs of SPACE."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=4))
    found = []
    for _ in range(count):
        trial = study.ask()
        sample(trial, SPACE, SCHEDULE)
        found.append({**trial.params, "precision": "int8"})
    return found


def test_a_calibration_times_files_of_each_precision_and_fits_them(monkeypatch):
    timed = []

    def counted(path, channels, resolution):
        timed.append(path.name)
        return file_latency_ms(path, channels, resolution)

    monkeypatch.setattr(latency_module, "file_latency_ms", counted)
    model = calibrate_latency(SPACE, SCHEDULE, seed=0, probes=3)
    assert len(timed) == 3 * len(SPACE.precisions)
    assert set(model.coefficients) == set(SPACE.precisions)
    assert all(w >= 0 for weights in model.coefficients.values() for w in weights)
    assert math.isfinite(model.worst_error)


def test_a_latency_budget_rejects_configs_clearly_too_slow_and_measures_the_rest(
    tmp_path, monkeypatch
):
    """With a model whose prediction is the config's MACs / 20,000 ms, a budget of 2.5 ms
    rejects configs above 400,000 MACs (2.5 ms x 20,000 x LATENCY_SLACK) before they
    train; the trained ones record the latency their files measured."""
    fixed = LatencyModel(
        {p: (1 / 20_000, 0.0, 0.0, 0.0) for p in SPACE.precisions}, worst_error=0.0
    )
    monkeypatch.setattr("compsearch.search.loop.calibrate_latency", lambda *args: fixed)
    budgets = Budgets(params=1e6, size_kb=100.0, latency_ms=2.5)
    data = load_dataset("digits", seed=0, subset=200)
    study = optuna.create_study(
        directions=list(DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed=3)
    )
    settings = SearchSettings(budgets, 2, None, 0, "cpu", tmp_path, early_stopping=False)
    counts = search(study, SPACE, SCHEDULE, data, settings, console=None)
    assert counts.trained == 2
    records = read_trials(study.trials)
    slow = [r for r in records if r.estimated_latency_ms / LATENCY_SLACK > 2.5]
    assert slow and all(not r.trained and "latency_ms" in r.reason for r in slow)
    for record, trial in zip(records, study.trials, strict=True):
        assert record.estimated_latency_ms == pytest.approx(
            fixed.predict(sample(optuna.trial.FixedTrial(trial.params), SPACE, SCHEDULE)),
            abs=1e-4,
        )
        if record.trained:
            assert record.latency_ms > 0
            assert record.feasible(budgets) == (record.latency_ms <= 2.5)


def test_objectives_parse_in_any_order_and_reject_others():
    from compsearch.search.common import UsageError
    from compsearch.search.options import parse_objectives

    assert parse_objectives("accuracy,size") == ("accuracy", "size")
    assert parse_objectives("latency, size,ACCURACY") == ("accuracy", "size", "latency")
    for wrong in ("accuracy", "accuracy,latency", "accuracy,size,speed", "accuracy,size,size"):
        with pytest.raises(UsageError, match="--objectives must be accuracy,size or"):
            parse_objectives(wrong)


def test_latency_as_an_objective_is_told_to_optuna_and_keeps_faster_trials_on_the_front(
    tmp_path, monkeypatch
):
    """A three-objective study: every trained trial's third value is its file's measured
    latency, a config never trained is told its least latency by estimate, and the front
    keeps a trial that only its speed saves."""
    from compsearch.results.records import StudySettings, write_settings
    from compsearch.results.table import pareto_front, trials_frame

    fixed = LatencyModel(
        {p: (1 / 20_000, 0.0, 0.0, 0.0) for p in SPACE.precisions}, worst_error=0.0
    )
    monkeypatch.setattr("compsearch.search.loop.calibrate_latency", lambda *args: fixed)
    budgets = Budgets(params=1e6, size_kb=8.0)  # small enough to reject some configs
    # Local pruning only: its estimates are exact, so no trial stops once pruned.
    space = dataclasses.replace(SPACE, prune_scopes=("local",))
    data = load_dataset("digits", seed=0, subset=200)
    study = optuna.create_study(
        directions=["maximize", "minimize", "minimize"],
        sampler=optuna.samplers.RandomSampler(seed=3),
    )
    write_settings(
        study, StudySettings("digits", budgets, objectives=("accuracy", "size", "latency"))
    )
    settings = SearchSettings(budgets, 3, None, 0, "cpu", tmp_path, early_stopping=False)
    counts = search(study, space, SCHEDULE, data, settings, console=None)
    assert counts.trained == 3
    records = read_trials(study.trials)
    assert any(not r.trained for r in records)
    for record, trial in zip(records, study.trials, strict=True):
        assert len(trial.values) == 3
        if record.trained:
            # trials.csv rounds latency to 1e-4 ms
            assert trial.values == pytest.approx(
                [record.accuracy, record.size_kb, record.latency_ms], abs=1e-4
            )
        else:
            assert trial.values[2] == pytest.approx(fixed.optimistic(
                sample(optuna.trial.FixedTrial(trial.params), space, SCHEDULE)
            ))  # fmt: skip
    frame = trials_frame(study, budgets)
    assert frame.attrs["objectives"] == ("accuracy", "size_kb", "latency_ms")
    # A made-up trial less accurate and larger than the best feasible one, but faster
    # than all.
    compared = frame[frame["feasible"].astype(bool) & frame["top_fidelity"].astype(bool)]
    assert len(compared)
    best = compared.sort_values("accuracy").iloc[-1]
    fast = best.copy()
    fast["number"], fast["feasible"], fast["top_fidelity"] = 999, True, True
    fast["accuracy"] -= 0.01
    fast["size_kb"] += 1.0
    fast["latency_ms"] = frame["latency_ms"].min() / 2
    with_fast = frame.copy()
    with_fast.loc[len(frame)] = fast
    with_fast.attrs = frame.attrs
    assert 999 in set(pareto_front(with_fast)["number"])
    assert 999 not in set(pareto_front(with_fast, ("accuracy", "size_kb"))["number"])


def test_three_objective_pareto_order_and_early_stopping_count_latency():
    from compsearch.search.fidelity import pareto_order
    from compsearch.search.loop import EARLY_STOPPING_MIN_TRIALS, EarlyStopper

    # (number, accuracy, size_kb, latency_ms): 1 is less accurate and larger than 0 but
    # the fastest; 2 is worse than 0 in all three, better than 1 in accuracy and size.
    points = [(0, 0.9, 10.0, 2.0), (1, 0.8, 12.0, 1.0), (2, 0.85, 11.0, 3.0)]
    assert pareto_order(points) == [0, 1, 2]
    assert pareto_order([p[:3] for p in points]) == [0, 2, 1]

    def stopper(latency_ms: float | None) -> EarlyStopper:
        """Finished trials no larger than 10 KB that reached 90% from 50% at the check,
        each 2 ms fast."""
        stop = EarlyStopper(
            optuna.create_study(directions=["maximize", "minimize", "minimize"]),
            size_kb=10.0, budgets=Budgets(1e6, 100.0), latency_ms=latency_ms,
        )  # fmt: skip
        stop.finished = [(0.5, 0.9, 10.0, True, 2.0)] * EARLY_STOPPING_MIN_TRIALS
        return stop

    assert stopper(None)(0.1) is not None  # two objectives: far behind, stopped
    assert stopper(3.0)(0.1).endswith("no larger and no slower than it")
    assert stopper(1.0)(0.1) is None  # it may be faster than all of them
    assert stopper(math.nan)(0.1) is None  # no estimate: none is known faster
