"""The cost model and --time: predicted seconds, the deadline, configs too slow to start."""

from __future__ import annotations

import dataclasses
import math

import optuna
import pytest
from conftest import SCHEDULE

import compsearch
from compsearch.objectives.data import load_dataset
from compsearch.results.records import PredictionErrors, read_trials
from compsearch.search.cost import MAX_TRIAL_SHARE, CostModel, Observation, TimeLimit
from compsearch.search.loop import MAX_TOO_SLOW_IN_A_ROW, SearchSettings, search
from compsearch.search.study import DIRECTIONS
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.cost import Work, training_work
from compsearch.spaces.space import sample, space_for

SPACE = space_for(1, 10, 8)
LOOSE = Budgets(params=1e6, size_kb=100.0)


def work(*values: float) -> Work:
    return Work(*values, *([0.0] * (len(Work.__dataclass_fields__) - len(values))))


def test_the_fit_recovers_the_coefficients_of_linear_seconds():
    true = (2e-9, 0.0, 1e-4, 0.0, 0.01, 0.02, 0.0, 0.5)
    observations = []
    for index in range(12):
        w = Work(
            1e9 * (index + 1), 1e7 * (index % 3), 300.0 * (index + 2), 5e5, 20 + index,
            (20 + index) * (index % 2), 0.0, 1.0,
        )  # fmt: skip
        observations.append(
            Observation(w, float(sum(a * b for a, b in zip(true, w.vector(), strict=True))))
        )
    model = CostModel.fit(observations)
    for observation in observations:
        assert model.predict(observation.work) == pytest.approx(observation.seconds, rel=1e-6)
    assert all(c >= 0 for c in model.coefficients)


def test_the_fit_keeps_every_coefficient_non_negative():
    # More MACs took less time here: least squares would give MACs a negative price.
    observations = [Observation(work(1e9, 0, 0, 0, 0, 0, 0, 1), 3.0),
                    Observation(work(2e9, 0, 0, 0, 0, 0, 0, 1), 2.0)]  # fmt: skip
    model = CostModel.fit(observations)
    assert min(model.coefficients) >= 0
    assert model.predict(work(5e9, 0, 0, 0, 0, 0, 0, 1)) > 0


def test_a_refit_uses_the_trained_trials_and_nothing_else():
    calibration = [Observation(work(1e9), 1.0)]
    model = CostModel.fit(calibration)
    study = optuna.create_study(directions=list(DIRECTIONS))
    for trained, seconds in ((True, 3.0), (True, 5.0), (False, 100.0)):
        trial = study.ask()
        trial.set_user_attr("trained", trained)
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("work", list(work(1e9, 0, 0, 0, 0, 0, 0, 1).vector()))
        study.tell(trial, [0.5, 1.0])
    refitted = model.refit(read_trials(study.trials))
    assert refitted.trials_fitted == 2
    # One second of MACs (the calibration) and a constant that splits 3 and 5 s.
    assert refitted.predict(work(1e9, 0, 0, 0, 0, 0, 0, 1)) == pytest.approx(4.0, rel=0.2)
    assert refitted.refit(read_trials(study.trials)) is refitted  # nothing new: no refit


def test_work_grows_with_epochs_and_counts_int8_only_for_int8():
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    config = sample(trial, SPACE, SCHEDULE)
    longer = dataclasses.replace(
        config, train=dataclasses.replace(config.train, epochs=config.train.epochs * 2)
    )
    base = training_work(config, 1000, 200, 8, 1)
    assert training_work(longer, 1000, 200, 8, 1).mac_images > base.mac_images
    assert training_work(config, 2000, 200, 8, 1).node_steps > base.node_steps
    # Pruning stretches the fine-tune (TrialConfig.epochs): more epochs of images to augment.
    by_fraction = {
        fraction: dataclasses.replace(
            config, compress=dataclasses.replace(config.compress, prune_fraction=fraction)
        )
        for fraction in (0.0, 0.5)
    }
    assert by_fraction[0.5].epochs > by_fraction[0.0].epochs
    pixels = {f: training_work(c, 1000, 200, 8, 1).pixel_images for f, c in by_fraction.items()}
    assert pixels[0.5] / pixels[0.0] == pytest.approx(
        by_fraction[0.5].epochs / by_fraction[0.0].epochs
    )
    for precision in ("fp32", "fp16", "int8"):
        compress = dataclasses.replace(config.compress, precision=precision)
        counted = training_work(dataclasses.replace(config, compress=compress), 1000, 200, 8, 1)
        assert (counted.int8_nodes > 0) == (precision == "int8")
        assert (counted.int8_finetune > 0) == (precision == "int8")


def test_a_time_limit_refuses_what_would_end_past_the_deadline_or_take_too_long():
    limit = TimeLimit.after(300, start=1000.0)
    assert limit.longest == pytest.approx(300 * MAX_TRIAL_SHARE)
    assert limit.too_slow(50, now=1000.0) == ""
    assert "more than" in limit.too_slow(150, now=1000.0)
    assert "s left before --time ends" in limit.too_slow(30, now=1280.0)
    assert limit.allowance(now=1280.0) == pytest.approx(20)


def test_prediction_errors_give_the_median_and_the_worst_with_its_sign():
    errors = PredictionErrors.of_pairs([(0, 9.0, 10.0), (1, 5.0, 10.0), (2, 12.0, 10.0),
                                        (3, math.nan, 10.0)])  # fmt: skip
    assert errors.trials == 3
    assert errors.median == pytest.approx(0.2)
    assert errors.worst == pytest.approx(-0.5) and errors.worst_trial == 1
    assert PredictionErrors.of_pairs([]) is None


def test_a_config_predicted_too_slow_is_rejected_with_its_reason_and_never_trained(tmp_path):
    data = load_dataset("digits", seed=0, subset=200)
    study = optuna.create_study(directions=list(DIRECTIONS))
    # An hour left, but no trial may take a millisecond: every config is too slow.
    limit = TimeLimit(deadline=TimeLimit.after(3600).deadline, longest=0.001)
    settings = SearchSettings(LOOSE, 3, limit, 0, "cpu", tmp_path, early_stopping=False)
    counts = search(study, SPACE, SCHEDULE, data, settings, console=None)
    assert counts.trained == 0 and counts.too_slow == MAX_TOO_SLOW_IN_A_ROW
    assert "predicted too slow" in counts.stopped_reason
    records = read_trials(study.trials)
    too_slow = [r for r in records if r.reason.startswith("too slow for the time left")]
    assert len(too_slow) == MAX_TOO_SLOW_IN_A_ROW
    for record, trial in zip(records, study.trials, strict=True):
        if record not in too_slow:
            assert record.reason.startswith("over budget before training")
            continue
        assert "the most one trial may take" in record.reason
        assert not record.trained and record.predicted_seconds > 0
        # A time constraint of its own; the deployment budgets hold.
        assert trial.constraints["seconds"] > 0
        assert all(v <= 0 for k, v in trial.constraints.items() if k != "seconds")
        assert not record.feasible(LOOSE)
    assert not list(tmp_path.rglob("*.onnx"))  # nothing was trained or exported


def test_a_timed_run_starts_no_trial_that_would_end_past_its_deadline(tmp_path):
    """From the records alone: each trial's start plus its predicted seconds lies before
    the run's deadline, and none started after it."""
    summary = compsearch.run(
        budget_params=2e6, budget_kb=300, trials=1000, time=20, epochs=2, subset=300,
        out=tmp_path, anchors=False, quiet=True,
    )  # fmt: skip
    assert summary.counts.stopped_reason
    study = optuna.load_study(
        study_name=summary.study, storage=f"sqlite:///{tmp_path / 'digits' / 'study.db'}"
    )
    started = 0
    for trial, record in zip(study.trials, read_trials(study.trials), strict=True):
        if record.reason.startswith("over budget before training"):
            continue
        assert record.deadline is not None and not math.isnan(record.predicted_seconds)
        if record.reason.startswith("too slow for the time left"):
            assert not record.trained
            continue
        started += 1
        assert trial.datetime_start.timestamp() + record.predicted_seconds <= record.deadline
    assert started >= 2
    assert PredictionErrors.of(read_trials(study.trials)) is not None
