"""The search loop's budget handling: fitting rejected proposals, early stopping."""

from __future__ import annotations

import dataclasses
import io

import onnx
import optuna
import pytest
from conftest import SCHEDULE, sampled_configs
from rich.console import Console

from compsearch.objectives.data import load_dataset
from compsearch.objectives.memory import peak_activation_bytes
from compsearch.objectives.trial import check_epoch, run_trial
from compsearch.results.records import read_trials
from compsearch.results.table import trials_frame
from compsearch.search import loop as run_module
from compsearch.search.loop import (
    EARLY_STOPPING_MARGIN,
    EARLY_STOPPING_MIN_TRIALS,
    EarlyStopper,
    SearchSettings,
    fit_to_budget,
    over_after_pruning,
    search,
)
from compsearch.search.study import DIRECTIONS
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.estimate import estimate, estimate_pruned
from compsearch.spaces.space import sample, space_for

SPACE = space_for(1, 10, 8)
TIGHT = Budgets(params=5_000, size_kb=8.0)
LOOSE = Budgets(params=1e6, size_kb=100.0)


def over_budget_proposals(count: int):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    found = []
    while len(found) < count:
        trial = study.ask()
        config = sample(trial, SPACE, SCHEDULE)
        expected = estimate(config)
        if TIGHT.excess(expected.params, expected.size_kb, expected.macs, expected.ram_kb):
            found.append((trial.params, config))
    return found


def test_fitting_shrinks_only_widths_and_depths_until_the_budgets_hold():
    fitted_any = 0
    for params, _config in over_budget_proposals(60):
        fitted = fit_to_budget(params, SPACE, SCHEDULE, TIGHT)
        if fitted is None:
            continue
        fitted_any += 1
        new = sample(optuna.trial.FixedTrial(fitted), SPACE, SCHEDULE)
        expected = estimate(new)
        assert not TIGHT.excess(expected.params, expected.size_kb, expected.macs, expected.ram_kb)
        for name, value in params.items():
            if name.endswith(("_width", "_depth")):
                assert fitted[name] <= value, name
            else:
                assert fitted[name] == value, name
    assert fitted_any >= 15  # about a third of random proposals can be fitted


def test_fitting_gives_up_when_the_narrowest_widths_break_the_budgets():
    params, _ = over_budget_proposals(1)[0]
    assert fit_to_budget(params, SPACE, SCHEDULE, Budgets(params=50, size_kb=0.5)) is None


def finished_study(results, sampler=None):
    """A study of trained trials given as (early accuracy, final accuracy, size_kb)."""
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=sampler)
    for early, final, size_kb in results:
        trial = study.ask()
        for name, value in dict(
            trained=True, early_accuracy=early, params=1000, size_kb=size_kb, macs=1e5
        ).items():
            trial.set_user_attr(name, value)
        study.tell(trial, [final, size_kb])
    return study


def test_early_stopping_stops_only_trials_that_cannot_reach_the_front():
    # Finished trials gained at most 0.10 between the check and the end.
    results = [(0.80, 0.90, 10.0 + i) for i in range(EARLY_STOPPING_MIN_TRIALS)]
    stopper = EarlyStopper(finished_study(results), size_kb=20.0, budgets=LOOSE)
    assert stopper(0.50) is not None  # at most 0.61 < 0.90 of a smaller trial
    assert stopper(0.79) is None  # could reach 0.90
    # Nothing smaller has finished: even a poor trial may be on the front at its size.
    assert EarlyStopper(finished_study(results), size_kb=5.0, budgets=LOOSE)(0.1) is None
    # Too few finished trials to know how much accuracy can still grow.
    few = finished_study(results[: EARLY_STOPPING_MIN_TRIALS - 1])
    assert EarlyStopper(few, size_kb=20.0, budgets=LOOSE)(0.1) is None


def test_a_search_stops_trials_early_and_counts_the_epochs_saved(tmp_path, monkeypatch):
    """Finished trials reached 100% with files smaller than any the space holds, gaining
    nothing after the check: every new trial short of 100% minus the margin at the check
    is stopped there, having trained only the check's epochs."""
    schedule = dataclasses.replace(SCHEDULE, epochs=4)  # the check after 1 of 4 epochs
    results = [(1.0, 1.0, 0.1)] * EARLY_STOPPING_MIN_TRIALS
    study = finished_study(results, optuna.samplers.RandomSampler(seed=3))
    seeded = len(study.trials)
    epochs_run: dict[int, int] = {}

    def counted_run_trial(config, data, folder, **options):
        number = int(folder.name)
        epochs_run[number] = 0

        def on_epoch(epoch: int, epochs: int, resolution: int) -> None:
            epochs_run[number] += 1

        return run_trial(config, data, folder, **{**options, "on_epoch": on_epoch})

    monkeypatch.setattr(run_module, "run_trial", counted_run_trial)
    data = load_dataset("digits", seed=0, subset=200)
    # One rung: every trial trains the whole schedule, as the finished trials did.
    settings = SearchSettings(LOOSE, 2, None, 0, "cpu", tmp_path, early_stopping=True, rungs=1)
    counts = search(study, SPACE, schedule, data, settings, console=None)
    new = study.trials[seeded:]
    stopped = [t for t in new if t.state == optuna.trial.TrialState.PRUNED]
    assert len(stopped) == counts.stopped_early == 2 and counts.trained == 0
    assert sorted(epochs_run) == [t.number for t in stopped]  # no other trial trained
    for trial in stopped:
        assert trial.user_attrs["reason"].startswith("stopped early: validation accuracy")
        assert trial.user_attrs["early_accuracy"] + EARLY_STOPPING_MARGIN < 1.0
        assert epochs_run[trial.number] == check_epoch(schedule) < schedule.epochs
        assert not (tmp_path / "trials" / f"{trial.number:05d}" / "model.onnx").exists()
    assert counts.epochs_trained == sum(epochs_run.values())
    # Saved: the epochs each would have trained, with the fine-tune pruning stretches.
    planned = {
        t.number: sample(optuna.trial.FixedTrial(t.params), SPACE, schedule).epochs for t in stopped
    }
    assert counts.epochs_saved == sum(planned[n] - run for n, run in epochs_run.items())


@pytest.mark.parametrize(
    ("budgets", "fit_after", "fitted_expected"),
    [
        (Budgets(params=20_000, size_kb=20.0), 1, True),  # a copy after every rejection
        (Budgets(params=20_000, size_kb=20.0), 0, False),  # never
        # Random proposals almost never fit these: copies are queued once it is stuck.
        (TIGHT, 50, True),
    ],
)
def test_the_search_trains_only_configs_within_the_budgets(
    tmp_path, budgets, fit_after, fitted_expected
):
    data = load_dataset("digits", seed=0, subset=200)
    study = optuna.create_study(
        directions=list(DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed=3)
    )
    settings = SearchSettings(
        budgets, 3, None, 0, "cpu", tmp_path, fit_after_rejections=fit_after, early_stopping=False
    )
    counts = search(study, SPACE, SCHEDULE, data, settings, console=None)
    # Early stopping is off: a trial stops only where global pruning broke the budgets.
    assert counts.trained + counts.stopped_early == 3 and counts.rejected > 0
    fitted = [t for t in study.trials if "fitted_from" in t.user_attrs]
    assert (len(fitted) > 0) == fitted_expected
    for trial in study.trials:
        trained = trial.user_attrs["trained"]
        estimated = (trial.user_attrs["estimated_params"], trial.user_attrs["estimated_size_kb"])
        if trial.state == optuna.trial.TrialState.PRUNED:
            assert trial.params["prune_scope"] == "global" and not trained
            assert not budgets.excess(*estimated, None, None)
            reason = trial.user_attrs["reason"]
            assert reason.startswith("stopped early: over budget after pruning")
            continue
        assert trained == (not budgets.excess(*estimated, None, None))
        # The estimate is exact for local pruning; global pruning chooses its own widths,
        # so only the measured figures it leaves decide whether it met the budgets.
        if trial.params["prune_scope"] == "local" or trial.params["prune_fraction"] == 0:
            assert all(value <= 0 for value in trial.constraints.values()) == trained


def test_a_ram_budget_rejects_by_estimate_and_records_the_files_measured_peak(tmp_path):
    """--budget-ram: a config whose peak activation memory breaks it is rejected before
    training, with the figure; each trained trial records its file's measured peak (in
    trials.csv as ram_kb), equal to the estimate where pruning is local."""
    budgets = Budgets(params=1e6, size_kb=100.0, ram_kb=8.0)  # about half the configs
    data = load_dataset("digits", seed=0, subset=200)
    study = optuna.create_study(
        directions=list(DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed=3)
    )
    settings = SearchSettings(budgets, 3, None, 0, "cpu", tmp_path, early_stopping=False)
    counts = search(study, SPACE, SCHEDULE, data, settings, console=None)
    assert counts.trained == 3
    records = read_trials(study.trials)
    over_ram = [r for r in records if r.estimated_ram_kb > 8.0]
    assert over_ram and all(not r.trained and "ram_kb" in r.reason for r in over_ram)
    frame = trials_frame(study, budgets)
    for record, trial in zip(records, study.trials, strict=True):
        assert "ram_kb" in trial.constraints
        if not record.trained:
            continue
        onnx_file = tmp_path / record.onnx_path
        assert record.ram_kb == peak_activation_bytes(onnx.load(onnx_file)) / 1000
        if trial.params["prune_scope"] == "local" or trial.params["prune_fraction"] == 0:
            assert record.ram_kb == record.estimated_ram_kb <= 8.0
        row = frame[frame["number"] == record.number].iloc[0]
        assert row["ram_kb"] == record.ram_kb and row["estimated_ram_kb"] == record.estimated_ram_kb


def test_a_search_logged_to_a_file_prints_one_line_per_trial(tmp_path):
    """Progress bars do not show in a log file; each trial's outcome does, by number."""
    data = load_dataset("digits", seed=0, subset=200)
    study = optuna.create_study(
        directions=list(DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed=3)
    )
    log = io.StringIO()
    settings = SearchSettings(TIGHT, 2, None, 0, "cpu", tmp_path, early_stopping=False)
    search(study, SPACE, SCHEDULE, data, settings, console=Console(file=log, width=100))
    lines = [line for line in log.getvalue().splitlines() if line.startswith("trial ")]
    assert [line.split(":")[0] for line in lines] == [f"trial {t.number}" for t in study.trials]
    for trial, line in zip(study.trials, lines, strict=True):
        if trial.user_attrs["trained"]:
            assert f"{trial.values[0]:.2%} at {trial.values[1]:.1f} KB" in line
        elif trial.state == optuna.trial.TrialState.PRUNED:  # global pruning overshot
            assert "stopped early: over budget after pruning, before the fine-tune: " in line
        else:
            assert "over budget by estimate: " in line


@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp", "random"])
def test_every_sampler_the_command_line_names_is_made_with_its_seed(name):
    from compsearch.search.common import SAMPLERS
    from compsearch.search.study import make_sampler

    assert name in SAMPLERS
    sampler = make_sampler(name, seed=7)
    assert isinstance(sampler, optuna.samplers.BaseSampler)
    assert type(sampler).__name__.lower().startswith(name[:2])


def told_trained(study: optuna.Study) -> None:
    trial = study.ask()
    trial.set_user_attr("trained", True)
    study.tell(trial, [0.5, 10.0])


def test_of_workers_that_asked_at_once_for_the_last_trial_only_the_lowest_number_runs():
    study = optuna.create_study(directions=DIRECTIONS)
    told_trained(study)
    pruned = study.ask()
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    rejected = study.ask()  # over budget by estimate: recorded, not counted
    study.tell(rejected, [0.0, 99.0])
    first, second = study.ask(), study.ask()  # two workers, each saw one trial left
    assert not run_module.surplus(study, first, finish_at=3)
    assert run_module.surplus(study, second, finish_at=3)
    # With two left, both run.
    assert not run_module.surplus(study, second, finish_at=4)


def test_a_surplus_trial_fails_with_its_reason_and_its_queued_config_waits_again():
    study = optuna.create_study(directions=DIRECTIONS)
    study.enqueue_trial({"stem_width": 16}, user_attrs={"anchor": "resnet8"})
    queued, sampled = study.ask(), study.ask()
    run_module.give_back(study, queued)
    run_module.give_back(study, sampled)
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert [trial.number for trial in failed] == [queued.number, sampled.number]
    assert {trial.user_attrs["reason"] for trial in failed} == {run_module.SURPLUS}
    assert all(trial.params == {} for trial in failed)  # nothing was sampled
    (waiting,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert waiting.user_attrs == {"anchor": "resnet8"}
    again = study.ask()
    assert again.number == waiting.number
    assert again.suggest_int("stem_width", 8, 64) == 16


def test_a_trial_whose_pruned_widths_break_the_budgets_stops_before_its_fine_tune(
    tmp_path, monkeypatch
):
    """Global pruning chooses its widths from the trained weights, so the estimate before
    training can be under what it leaves. Here the estimate is made to say 1 parameter,
    so the config is trained; once pruned its widths break the budget and the trial stops
    there, its fine-tune never trained and no file written."""
    space = dataclasses.replace(
        SPACE, stages=1, depth=(2, 2), width=(32, 32), stem_width=(16, 16),
        kernel_sizes=(3,), strides=(1,), blocks=("plain",), squeeze_excitation=(False,),
        activations=("relu",), precisions=("fp32",), prune_fraction=(0.7, 0.7),
        prune_criteria=("l2",), prune_scopes=("global",),
    )  # fmt: skip
    config = sample(optuna.create_study().ask(), space, SCHEDULE)
    budgets = Budgets(params=1000, size_kb=1000.0)
    assert estimate(config).params > 1000  # an honest estimate would reject it

    def underestimate(config, file_format="onnx"):
        return dataclasses.replace(estimate(config, file_format), params=1)

    monkeypatch.setattr(run_module, "estimate", underestimate)
    epochs_run: list[int] = []

    def counted_run_trial(config, data, folder, **options):
        def on_epoch(epoch: int, epochs: int, resolution: int) -> None:
            epochs_run.append(epoch)

        return run_trial(config, data, folder, **{**options, "on_epoch": on_epoch})

    monkeypatch.setattr(run_module, "run_trial", counted_run_trial)
    study = optuna.create_study(directions=list(DIRECTIONS))
    data = load_dataset("digits", seed=0, subset=200)
    settings = SearchSettings(budgets, 1, None, 0, "cpu", tmp_path, early_stopping=False)
    counts = search(study, space, SCHEDULE, data, settings, console=None)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert counts.stopped_early == 1 and counts.trained == 0
    reason = trial.user_attrs["reason"]
    assert reason.startswith(
        "stopped early: over budget after pruning, before the fine-tune: params"
    )
    assert len(epochs_run) == SCHEDULE.epochs - SCHEDULE.finetune_epochs
    assert not (tmp_path / "trials" / f"{trial.number:05d}" / "model.onnx").exists()
    assert counts.epochs_saved == config.epochs - len(epochs_run)


def test_over_after_pruning_judges_the_widths_pruning_left():
    config = sampled_configs(SPACE, 1, seed=4)[0]
    pruned = dataclasses.replace(
        config, compress=dataclasses.replace(config.compress, prune_fraction=0.5)
    )
    exact = estimate_pruned(pruned)  # its arch as it stands: the widths pruning left
    assert over_after_pruning(pruned, Budgets(params=exact.params, size_kb=1e3), "onnx") is None
    reason = over_after_pruning(pruned, Budgets(params=exact.params - 1, size_kb=1e3), "onnx")
    assert reason == (
        "over budget after pruning, before the fine-tune: "
        f"params {exact.params:,} > {exact.params - 1:,}"
    )
