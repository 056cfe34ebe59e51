"""Multi-fidelity search: the ladder of fidelities, promotion by Pareto order, and a search
that trains configs at the bottom rung and promotes the non-dominated ones."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from conftest import SCHEDULE, sampled_configs

from compsearch.objectives.data import load_dataset
from compsearch.results.plots import pareto_figure, pyplot
from compsearch.results.records import at_top_fidelity, best_feasible, read_trials
from compsearch.results.table import pareto_front, trials_frame
from compsearch.search import loop
from compsearch.search.cost import CostModel, work_of
from compsearch.search.fidelity import (
    ETA,
    MIN_EPOCHS,
    MOST_EPOCHS_FACTOR,
    epochs_for_seconds,
    ladder,
    pareto_order,
    reference_seconds,
    rung_schedule,
    seconds_ladder,
    to_promote,
    with_epochs,
)
from compsearch.search.loop import EarlyStopper, SearchSettings, search
from compsearch.search.study import DIRECTIONS
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.space import sample, space_for

BUDGETS = Budgets(params=1e6, size_kb=100.0)


def constructed(points):
    """Trained trials given as (accuracy, size_kb, rung, rungs, promoted_from), read back
    from a real in-memory study as the search reads them."""
    study = optuna.create_study(directions=list(DIRECTIONS))
    for accuracy, size_kb, rung, rungs, promoted_from in points:
        attrs = dict(
            trained=True, params=1000, size_kb=size_kb, macs=1e5, rung=rung, rungs=rungs,
            train_images=100,
        )  # fmt: skip
        if promoted_from is not None:
            attrs["promoted_from"] = promoted_from
        study.add_trial(optuna.trial.create_trial(values=[accuracy, size_kb], user_attrs=attrs))
    return read_trials(study.trials)


def test_pareto_order_gives_each_front_in_turn_the_most_accurate_first():
    points = [(0, 0.9, 50.0), (1, 0.6, 5.0), (2, 0.8, 20.0), (3, 0.7, 30.0), (4, 0.5, 40.0)]
    # Front 1: 0, 2, 1 (by accuracy); 3 is beaten by 2 only; 4 by 3 too.
    assert pareto_order(points) == [0, 2, 1, 3, 4]


def test_promotion_picks_the_non_dominated_feasible_trials_of_a_rung():
    non_dominated = [(0.90, 50.0), (0.80, 20.0), (0.60, 5.0)]
    dominated = [(0.85, 60.0), (0.70, 30.0), (0.50, 10.0), (0.55, 25.0), (0.65, 40.0),
                 (0.75, 55.0)]  # fmt: skip
    over_budget = [(0.99, 500.0)]  # the most accurate, but breaks size_kb
    points = [(a, s, 0, 3, None) for a, s in dominated[:3] + non_dominated + dominated[3:]]
    points += [(a, s, 0, 3, None) for a, s in over_budget]
    records = constructed(points)
    promoted = to_promote(records, BUDGETS, rungs=3)
    # Nine feasible trials at rung 0: one in ETA of them goes up, the three non-dominated.
    assert len([r for r in records if r.feasible(BUDGETS)]) // ETA == 3
    assert sorted(promoted) == [(3, 1), (4, 1), (5, 1)]
    assert {(records[n].accuracy, records[n].size_kb) for n, _ in promoted} == set(non_dominated)


def test_a_trial_is_promoted_once_and_the_top_rung_never():
    points = [(0.9, 10.0, 0, 2, None), (0.5, 20.0, 0, 2, None), (0.4, 30.0, 0, 2, None)]
    assert to_promote(constructed(points), BUDGETS, rungs=2) == [(0, 1)]
    # Its copy at rung 1 exists (queued, running or done): not again. Rung 1 is the top.
    points.append((0.95, 10.0, 1, 2, 0))
    assert to_promote(constructed(points), BUDGETS, rungs=2) == []
    # Too few finished trials at a rung: nobody has earned a place yet.
    assert to_promote(constructed(points[:2]), BUDGETS, rungs=2) == []


def test_with_fewer_places_than_the_front_the_most_accurate_of_it_go_up():
    points = [(0.9, 50.0), (0.8, 20.0), (0.6, 5.0), (0.5, 60.0), (0.4, 70.0), (0.3, 80.0)]
    records = constructed([(a, s, 0, 3, None) for a, s in points])
    assert to_promote(records, BUDGETS, rungs=3) == [(0, 1), (1, 1)]


def test_the_ladder_trains_eta_times_more_at_each_rung_up_to_the_schedule():
    rungs = ladder(epochs=12, images=9000, classes=10, rungs=3)
    assert [f.rung for f in rungs] == [0, 1, 2] and all(f.rungs == 3 for f in rungs)
    top = rungs[-1]
    assert (top.epochs, top.images) == (12, 9000) and top.top
    work = [f.epochs * f.images for f in rungs]
    for low, high in zip(work, work[1:], strict=False):
        assert high / low == pytest.approx(ETA, rel=0.01)
    # Epochs are cut first, to two (train, then fine-tune); then images.
    assert (rungs[1].epochs, rungs[1].images) == (4, 9000)
    assert (rungs[0].epochs, rungs[0].images) == (2, 6000)


def test_rungs_that_the_floors_make_equal_are_left_out():
    # Two epochs on 200 images of ten classes: nothing cheaper is allowed.
    assert [(f.epochs, f.images, f.rungs) for f in ladder(2, 200, 10, 3)] == [(2, 200, 1)]
    assert [(f.epochs, f.images) for f in ladder(4, 200, 10, 3)] == [(2, 200), (4, 200)]
    assert len(ladder(12, 9000, 10, rungs=1)) == 1


def test_early_stopping_compares_a_trial_only_with_trials_of_its_rung():
    study = optuna.create_study(directions=list(DIRECTIONS))
    for _ in range(10):  # rung 1 of 2: reached 100% after 90% at the check
        trial = study.ask()
        for name, value in dict(
            trained=True, early_accuracy=0.9, params=1000, size_kb=1.0, macs=1e5, rung=1,
            rungs=2, train_images=100,
        ).items():  # fmt: skip
            trial.set_user_attr(name, value)
        study.tell(trial, [1.0, 1.0])
    rung0, rung1 = ladder(4, 100, 5, rungs=2)
    assert EarlyStopper(study, 20.0, BUDGETS, rung1)(0.2) is not None
    assert EarlyStopper(study, 20.0, BUDGETS, rung0)(0.2) is None  # nothing of its rung


def test_a_search_promotes_the_non_dominated_and_compares_like_with_like(tmp_path):
    data = load_dataset("digits", seed=0, subset=600)
    space = space_for(1, 10, 8)
    schedule = dataclasses.replace(SCHEDULE, epochs=6)
    fidelities = ladder(6, len(data.train), 10, rungs=3)
    assert len(fidelities) == 3  # 2 x 200, 2 x 600, 6 x 600
    study = optuna.create_study(
        directions=list(DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed=1)
    )
    # 16 trials: enough for a promotion to the top whichever configs rank first (at
    # least 9 at the bottom and 3 at rung 1 must finish before one can go up to rung 2).
    settings = SearchSettings(BUDGETS, 16, None, 0, "cpu", tmp_path, early_stopping=False, rungs=3)
    counts = search(study, space, schedule, data, settings, console=None)
    assert counts.trained == 16
    records = read_trials(study.trials)
    by_number = {record.number: record for record in records}
    trained = [record for record in records if record.trained]
    for record in trained:  # each trained as its rung says
        fidelity = fidelities[record.rung]
        assert record.rungs == 3 and record.train_images == fidelity.images
        assert record.config.train.epochs == fidelity.epochs
    promoted = [record for record in records if record.promoted_from is not None]
    assert {record.rung for record in promoted} == {1, 2}
    for copy in promoted:
        source = by_number[copy.promoted_from]
        assert copy.number > source.number and copy.rung == source.rung + 1
        assert copy.searched == source.searched  # the same config, trained more
        assert source.feasible(BUDGETS)
        # It was in the first len // ETA in Pareto order of its rung when it went up.
        before = [r for r in records if r.rung == source.rung and r.number < copy.number]
        points = [(r.number, r.accuracy, r.size_kb) for r in before if r.feasible(BUDGETS)]
        assert source.number in pareto_order(points)[: len(points) // ETA]
    # Fewer trials at each rung than at the one below, and some at the top.
    per_rung = [sum(r.rung == rung for r in trained) for rung in range(3)]
    assert per_rung[0] > per_rung[1] > per_rung[2] >= 1, per_rung
    # The front, the table's top_fidelity and the best trial: the top rung only.
    top = at_top_fidelity(records, BUDGETS)
    assert top and all(record.rung == 2 for record in top)
    assert best_feasible(records, BUDGETS).rung == 2
    frame = trials_frame(study, BUDGETS)
    assert set(pareto_front(frame)["number"]) <= {record.number for record in top}
    assert set(frame[frame["promoted_from"].notna()]["number"]) == {r.number for r in promoted}
    assert sorted(frame["rung"].unique()) == [1, 2, 3]  # from 1, as the user reads it
    # The figure: the front and the blue points from the top rung, lower rungs in grey.
    figure = pareto_figure(frame, BUDGETS, "rungs")
    drawn = {c.get_label(): len(c.get_offsets()) for c in figure.axes[0].collections}
    lower = int((frame["feasible"] & ~frame["top_fidelity"]).sum())
    assert drawn[f"feasible, lower rungs ({lower})"] == lower > 0
    assert drawn[f"feasible ({len(top)}), highest rung"] == len(top)
    assert drawn[f"Pareto front ({len(pareto_front(frame))})"] <= len(top)
    pyplot().close(figure)


def test_a_ladder_in_seconds_gives_every_rung_a_third_of_the_next_on_every_image():
    rungs = seconds_ladder(90.0, epochs=12, images=9000, rungs=3)
    assert [f.seconds for f in rungs] == pytest.approx([10.0, 30.0, 90.0])
    assert all(f.images == 9000 and f.epochs == 12 and f.rungs == 3 for f in rungs)
    assert rungs[-1].top and "90 s on 9,000 images" in rungs[-1].describe()
    # Its rungs leave the schedule's epochs alone: each trial is sized to the seconds.
    assert rung_schedule(SCHEDULE, rungs[0]) == SCHEDULE


def test_epochs_for_seconds_gives_a_cheaper_config_more_epochs_within_the_seconds():
    space = space_for(1, 10, 8)
    small, large = sampled_configs(space, 2, seed=0)

    def predict(config):  # 1 s per trial, then a config's seconds per epoch
        per_epoch = 0.5 if config is small or config.arch == small.arch else 2.0
        return 1.0 + per_epoch * config.train.epochs

    assert epochs_for_seconds(small, 11.0, predict, most=100) == 20  # 1 + 0.5 x 20 = 11
    assert epochs_for_seconds(large, 11.0, predict, most=100) == 5  # 1 + 2 x 5 = 11
    assert epochs_for_seconds(small, 11.0, predict, most=8) == 8  # capped
    # Not even the floor fits: the floor, two epochs (train, then fine-tune).
    assert epochs_for_seconds(large, 2.0, predict, most=100) == MIN_EPOCHS
    sized = dataclasses.replace(small, train=with_epochs(small.train, 20))
    assert (sized.train.epochs, sized.train.finetune_epochs) == (20, 5)


def test_trials_of_one_rung_in_seconds_compare_alike_whatever_their_epochs():
    study = optuna.create_study(directions=list(DIRECTIONS))
    config = sampled_configs(space_for(1, 10, 8), 1, seed=0)[0]
    for epochs, rung in ((20, 1), (5, 1), (9, 0)):
        sized = dataclasses.replace(config, train=with_epochs(config.train, epochs))
        attrs = dict(
            trained=True, params=1000, size_kb=1.0, macs=1e5, rung=rung, rungs=2,
            train_images=100, fidelity_seconds=30.0 if rung else 10.0, config=sized.to_dict(),
        )  # fmt: skip
        study.add_trial(optuna.trial.create_trial(values=[0.5, 1.0], user_attrs=attrs))
    records = read_trials(study.trials)
    assert [r.number for r in at_top_fidelity(records, BUDGETS)] == [0, 1]
    assert records[0].fidelity == records[1].fidelity > records[2].fidelity


def test_a_search_in_seconds_sizes_each_trial_to_its_rungs_seconds(tmp_path, monkeypatch):
    """A real search whose cost model prices multiply-accumulates alone (1 s per 1e9, and
    0.1 s per trial) and is never refitted, so that configs of the space differ in cost
    and the sizing can be checked exactly."""
    model = CostModel((1e-9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1))
    monkeypatch.setattr(loop, "calibrate", lambda *args: model)
    monkeypatch.setattr(CostModel, "refit", lambda self, records: self)
    data = load_dataset("digits", seed=0, subset=300)
    space = space_for(1, 10, 8)
    schedule = dataclasses.replace(SCHEDULE, epochs=6)
    study = optuna.create_study(
        directions=list(DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed=2)
    )
    settings = SearchSettings(
        BUDGETS, 7, None, 0, "cpu", tmp_path, early_stopping=False, rungs=2, fidelity="seconds"
    )  # fmt: skip
    counts = search(study, space, schedule, data, settings, console=None)
    assert counts.trained == 7

    def predict(config):
        return model.predict(work_of(config, data))

    trained = [record for record in read_trials(study.trials) if record.trained]
    top = reference_seconds(space, schedule, BUDGETS, predict, 0)
    assert {record.rung: record.fidelity_seconds for record in trained} == pytest.approx(
        {0: top / ETA, 1: top}, rel=1e-3
    )
    for record in trained:
        assert record.train_images == len(data.train) and record.rungs == 2
        # The most epochs the cost model fits in its rung's seconds (at least two).
        config = sample(optuna.trial.FixedTrial(record.searched), space, schedule)
        most = MOST_EPOCHS_FACTOR * schedule.epochs
        assert record.config.train.epochs == epochs_for_seconds(
            config, record.fidelity_seconds, predict, most
        )
        assert record.config.train.epochs == MIN_EPOCHS or (
            record.predicted_seconds <= record.fidelity_seconds
        )
    assert len({record.config.train.epochs for record in trained}) > 1  # sized one by one
    promoted = [record for record in trained if record.promoted_from is not None]
    assert promoted and all(record.rung == 1 for record in promoted)
    assert {record.rung for record in at_top_fidelity(trained, BUDGETS)} == {1}
