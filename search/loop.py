"""The search: trial after trial (sample, check budgets, train, measure, tell Optuna) until
enough have finished, with the rules that stop it early, stop a trial early or shrink a
config to fit."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console

from compsearch.objectives.data import Dataset
from compsearch.objectives.train import DeviceData, Distillation, TrainingDiverged
from compsearch.objectives.trial import StoppedEarly, TrialResult, run_trial
from compsearch.results.records import (
    INTERRUPTED,
    SURPLUS,
    TrialRecord,
    fitted_attrs,
    is_fitted_copy,
    promoted_attrs,
    read_trials,
    study_objective_columns,
    write_estimate,
    write_failed,
    write_fidelity,
    write_prediction,
    write_rejected,
    write_result,
    write_stopped_early,
    write_too_slow,
    write_worker,
)
from compsearch.search.common import DEFAULT_FIDELITY, DEFAULT_RUNGS, first_line
from compsearch.search.cost import CostModel, TimeLimit, calibrate, work_of
from compsearch.search.fidelity import (
    MOST_EPOCHS_FACTOR,
    Fidelity,
    epochs_for_seconds,
    ladder,
    reference_seconds,
    rung_schedule,
    seconds_ladder,
    to_promote,
    with_epochs,
)
from compsearch.search.latency import LatencyModel, calibrate_latency
from compsearch.search.optuna_private import fixed_params, heartbeat_thread, storage_of, trial_id
from compsearch.search.progress import Display
from compsearch.search.study import Retry
from compsearch.search.supervise import STOP_REQUESTED, Reporter
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.config import TrainConfig, TrialConfig
from compsearch.spaces.estimate import Estimate, estimate, estimate_pruned
from compsearch.spaces.space import SearchSpace, sample

# Stop asking when this many configs in a row break the budgets: the space is then
# almost all infeasible and the user should narrow it or relax the budgets.
MAX_REJECTIONS_IN_A_ROW = 500
MAX_FAILURES_IN_A_ROW = 10
# With --time, stop when this many configs in a row (those over budget aside) were
# predicted too slow for the time left: the sampler has little chance of proposing one
# quick enough.
MAX_TOO_SLOW_IN_A_ROW = 25
# Which process ran a trial, for the record and for telling workers apart.
WORKER = f"{socket.gethostname()}:{os.getpid()}"
WAIT_SECONDS = 2.0  # between looks at the study while other workers finish the last trials

# Measured by bench/search_efficiency.py (see the README). Queueing a shrunk copy of every
# over-budget proposal lowered the front's hypervolume (rejections cost nothing, copies
# cost a trial each), so a copy is queued only when the sampler is stuck: after this many
# rejections in a row. Early stopping saved compute at no measurable cost.
FIT_AFTER_REJECTIONS_IN_A_ROW = 50
EARLY_STOPPING = True
# Early stopping needs this many finished trials to know how much accuracy can still
# grow after the check, and stops a trial only when even the largest growth seen, plus
# this margin, leaves it short of a smaller trial's accuracy.
EARLY_STOPPING_MIN_TRIALS = 8
EARLY_STOPPING_MARGIN = 0.01  # accuracy, as a fraction


def default_schedule(epochs: int, resolution: int) -> TrainConfig:
    """A trial's training: a quarter of the epochs (at least one) fine-tune at the test
    resolution; `sample` picks the low training resolution."""
    return TrainConfig(
        epochs=epochs,
        finetune_epochs=max(1, round(epochs * 0.25)),
        train_resolution=resolution,
        test_resolution=resolution,
        batch_size=64,
        learning_rate=0.1,
        weight_decay=5e-4,
        label_smoothing=0.1,
    )


@dataclass(frozen=True)
class SearchSettings:
    budgets: Budgets
    trials: int  # trained trials to add
    # --time: no trial starts whose predicted end lies past its deadline; None: no limit.
    time_limit: TimeLimit | None
    seed: int
    device: str
    folder: Path  # the study's folder: trial files go below it
    # Queue a copy shrunk to fit the budgets after this many rejections in a row (1: after
    # every rejection; 0: never).
    fit_after_rejections: int = FIT_AFTER_REJECTIONS_IN_A_ROW
    early_stopping: bool = EARLY_STOPPING
    # Stop after this many trials in a row failed (diverged, out of memory): the space or
    # the schedule is wrong, and more trials would only fail too.
    max_failures_in_a_row: int = MAX_FAILURES_IN_A_ROW
    # Finished trials in the study at which every worker stops; None: those there now
    # plus `trials`. Workers started together share one figure, so N means N in all.
    finish_at: int | None = None
    # Fidelities of the successive halving (search/fidelity.py); 1: every trial trains
    # the whole schedule on every training image.
    rungs: int = DEFAULT_RUNGS
    # What a rung counts: "epochs" (x images) or "seconds" (predicted, equal per config).
    fidelity: str = DEFAULT_FIDELITY
    file_format: str = "onnx"  # each trial's file: ONNX, or an int8 .tflite (run --format)


@dataclass
class SearchCounts:
    trained: int = 0
    rejected: int = 0  # over budget by estimate, never trained
    too_slow: int = 0  # predicted to overrun the time left (--time), never trained
    fitted: int = 0  # shrunk copies of rejected configs queued to fit the budgets
    stopped_early: int = 0
    epochs_trained: int = 0
    epochs_saved: int = 0  # by early stopping
    failed: int = 0
    infeasible_after_training: int = 0
    stopped_reason: str = ""
    rejections_in_a_row: int = 0
    too_slow_in_a_row: int = 0
    failures_in_a_row: int = 0
    last_failure: str = ""  # the exception type of the last failed trial
    # Trained trials by rung (from 0), when the run has more than one.
    trained_per_rung: dict[int, int] = dataclasses.field(default_factory=dict)

    def add(self, outcome: Outcome) -> None:
        self.epochs_trained += outcome.epochs_trained
        self.epochs_saved += outcome.epochs_saved
        self.rejections_in_a_row = self.rejections_in_a_row + 1 if outcome.kind == "rejected" else 0
        if outcome.kind != "rejected":  # configs over budget do not break a run of slow ones
            self.too_slow_in_a_row = self.too_slow_in_a_row + 1 if outcome.kind == "too slow" else 0
        if outcome.kind == "too slow":
            self.too_slow += 1
        elif outcome.kind == "rejected":
            self.rejected += 1
            self.fitted += outcome.fitted
        elif outcome.kind == "stopped early":
            self.stopped_early += 1
        elif outcome.kind == "failed":
            self.failed += 1
            self.failures_in_a_row += 1
            self.last_failure = outcome.failure
        else:
            self.trained += 1
            self.trained_per_rung[outcome.rung] = self.trained_per_rung.get(outcome.rung, 0) + 1
            self.failures_in_a_row = 0
            self.infeasible_after_training += not outcome.feasible


def trained_outcome(result: TrialResult, over: list[str]) -> str:
    """One trained trial, as a log line shows it."""
    text = (
        f"{result.accuracy:.2%} at {result.size_kb:.1f} KB "
        f"({result.config.compress.precision}), {result.params:,} params, "
        f"{result.seconds:.0f} s"
    )
    return text + (f"; over budget as measured: {', '.join(over)}" if over else "")


# This loop runs Optuna's heartbeat itself (see `heartbeat`), which Optuna warns about
# when it is not study.optimize that does so.
HEARTBEAT_WARNING = "Heartbeat of storage is supposed to be used with Study.optimize"


def finished_and_running(study: optuna.Study) -> tuple[int, int]:
    """(trials trained or stopped early, trials running now), across all workers."""
    trials = study.get_trials(deepcopy=False)
    running = sum(trial.state == TrialState.RUNNING for trial in trials)
    return sum(map(is_finished, trials)), running


def is_finished(trial: optuna.trial.FrozenTrial) -> bool:
    """Trained to the end or stopped early: what --trials counts."""
    return trial.state == TrialState.PRUNED or (
        trial.state == TrialState.COMPLETE and bool(trial.user_attrs.get("trained"))
    )


def surplus(study: optuna.Study, trial: optuna.Trial, finish_at: int) -> bool:
    """Whether `trial` is one too many: workers that looked at the study at the same time
    all saw a trial left and all asked for one. Of those, the lowest numbers run."""
    trials = study.get_trials(deepcopy=False)
    before = sum(t.state == TrialState.RUNNING and t.number < trial.number for t in trials)
    return sum(map(is_finished, trials)) + before >= finish_at


def give_back(study: optuna.Study, trial: optuna.Trial) -> None:
    """Fail a surplus trial before it samples anything, with the reason, and queue again
    the config it took from the queue (an anchor, a promotion, a retry), as it was."""
    frozen = storage_of(study).get_trial(trial_id(trial))
    fixed = fixed_params(frozen)
    if fixed is not None:
        study.enqueue_trial(fixed, user_attrs=dict(frozen.user_attrs))
    write_failed(trial, SURPLUS)
    study.tell(trial, state=TrialState.FAIL)


def waiting_trials(study: optuna.Study) -> int:
    """Configs queued to run again after their worker was interrupted or lost (not the
    anchors or shrunk copies also waiting in the queue)."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return sum(record.retry_of is not None for record in read_trials(waiting))


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the trials whose worker stopped answering and queue them again (Optuna's own
    recovery, which study.optimize runs before each trial)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial):
    """Optuna's heartbeat thread, as study.optimize runs it, for this ask-and-tell loop:
    it tells the storage every few seconds that the trial's worker is alive."""
    with heartbeat_thread(study, trial):
        yield


class Costs:
    """The search's cost model: calibrated when the first config needs a prediction (a
    worker with nothing left to do never times anything), then refitted on the study's
    finished trials before each trial (other workers may have trained them)."""

    def __init__(self, calibrate: Callable[[list[TrialRecord]], CostModel]) -> None:
        self.calibrate = calibrate
        self.model: CostModel | None = None

    def refit(self, records: list[TrialRecord]) -> CostModel:
        if self.model is None:
            self.model = self.calibrate(records)
        self.model = self.model.refit(records)
        return self.model


class Latency:
    """The search's latency model: calibrated on this machine when the first config needs
    a prediction (only under --budget-latency)."""

    def __init__(self, calibrate: Callable[[], LatencyModel]) -> None:
        self.calibrate = calibrate
        self.model: LatencyModel | None = None

    def get(self) -> LatencyModel:
        if self.model is None:
            self.model = self.calibrate()
        return self.model


@dataclass(frozen=True)
class SearchJob:
    """What every trial of one search shares."""

    study: optuna.Study
    space: SearchSpace
    schedule: TrainConfig
    data: Dataset
    on_device: DeviceData  # the data on the training device, once: every trial trains from it
    settings: SearchSettings
    distillation: Distillation | None
    display: Display | None
    reporter: Reporter
    costs: Costs
    fidelities: tuple[Fidelity, ...]  # the ladder, cheapest first
    latency: Latency
    # The training data of each rung on the device, made when a rung first trains.
    rung_data: dict[int, DeviceData] = dataclasses.field(default_factory=dict)

    def fidelity_of(self, trial: optuna.Trial) -> Fidelity:
        """The rung a trial trains at: the bottom one for a sampled config, the one it was
        promoted to for a promoted copy (the top one when the run has fewer rungs)."""
        rung = trial.user_attrs.get("rung", 0)
        return self.fidelities[min(rung, len(self.fidelities) - 1)]

    def data_at(self, fidelity: Fidelity) -> DeviceData:
        if fidelity.rung not in self.rung_data:
            self.rung_data[fidelity.rung] = self.on_device.subset(fidelity.images)
        return self.rung_data[fidelity.rung]


@dataclass(frozen=True)
class Outcome:
    """How one trial ended: "rejected" (over budget), "too slow" (for the time left),
    "stopped early", "failed" or "trained"."""

    kind: str
    text: str  # as a log line shows it
    epochs_trained: int = 0
    epochs_saved: int = 0
    result: TrialResult | None = None
    feasible: bool = False
    fitted: bool = False  # a shrunk copy of the rejected config was queued
    failure: str = ""  # the exception's type, for a failed trial
    rung: int = 0  # of a trained trial


def search(
    study: optuna.Study,
    space: SearchSpace,
    schedule: TrainConfig,
    data: Dataset,
    settings: SearchSettings,
    console: Console | None,
    distillation: Distillation | None = None,
    on_device: DeviceData | None = None,
    reporter: Reporter | None = None,
) -> SearchCounts:
    """Add `settings.trials` finished trials to `study` (fewer on timeout or Ctrl-C).

    A finished trial was trained to the end or stopped early; configs over the budgets by
    estimate are recorded but never trained and do not count. `reporter` is told each
    trial's steps and outcome, for the supervisor that fails a trial whose process died.
    """
    on_device = on_device or DeviceData(data, settings.device)
    reporter = reporter or Reporter(None)
    costs = Costs(
        lambda records: calibrate(space, schedule, data, on_device, settings.seed, records)
    )
    fidelities = run_ladder(study, space, schedule, data, settings, costs)
    if console is not None and settings.fidelity == "seconds":
        console.print(
            "fidelity in predicted seconds on every training image, epochs sized per config: "
            + ", ".join(f"{f.seconds:.0f} s" for f in fidelities)
        )
    job = SearchJob(
        study, space, schedule, data, on_device, settings, distillation,
        Display(console, settings.trials) if console is not None else None, reporter, costs,
        fidelities, Latency(lambda: calibrate_latency(space, schedule, settings.seed)),
    )  # fmt: skip
    counts = SearchCounts()
    fail_stale_trials(study)
    finish_at = settings.finish_at
    if finish_at is None:
        finish_at = finished_and_running(study)[0] + settings.trials
    with job.display or contextlib.nullcontext(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=HEARTBEAT_WARNING)
        while True:
            if STOP_REQUESTED.is_set():  # a Ctrl-C that a callback swallowed
                raise KeyboardInterrupt
            fail_stale_trials(study)
            finished, running = finished_and_running(study)
            if finished >= finish_at:
                break
            if finished + running >= finish_at:
                # Other workers are on the last trials; one of them may still fail.
                time.sleep(WAIT_SECONDS)
                continue
            counts.stopped_reason = stop_reason(counts, settings)
            if counts.stopped_reason:
                break
            promote(study, settings.budgets, len(fidelities))
            trial = study.ask()
            if surplus(study, trial, finish_at):
                give_back(study, trial)
                continue
            try:
                write_worker(trial, WORKER)
                with heartbeat(study, trial):
                    outcome = run_one(job, trial, counts.rejections_in_a_row)
            except KeyboardInterrupt:
                # Wherever in the trial Ctrl-C came: sampling, training, measuring or
                # telling the storage.
                abandon(study, trial)
                raise
            counts.add(outcome)
            job.reporter.done(trial.number, outcome.kind)
            if job.display:
                job.display.trial_done(
                    counts.trained + counts.stopped_early, counts.rejected + counts.too_slow,
                    trial.number,
                    outcome.text, outcome.result, outcome.feasible,
                )  # fmt: skip
    return counts


def run_ladder(
    study: optuna.Study,
    space: SearchSpace,
    schedule: TrainConfig,
    data: Dataset,
    settings: SearchSettings,
    costs: Costs,
) -> tuple[Fidelity, ...]:
    """The run's fidelities. Counted in seconds, the top rung's are what a typical config
    takes for the schedule's epochs by the cost model (so it is calibrated now), and no
    more than one trial may take under --time."""
    if settings.fidelity == "epochs":
        return ladder(schedule.epochs, len(data.train), data.num_classes, settings.rungs)
    model = costs.refit(read_trials(study.get_trials(deepcopy=False)))
    top = reference_seconds(
        space, schedule, settings.budgets, lambda config: model.predict(work_of(config, data)),
        settings.seed, settings.file_format,
    )  # fmt: skip
    if settings.time_limit is not None:
        top = min(top, settings.time_limit.longest)
    return seconds_ladder(top, schedule.epochs, len(data.train), settings.rungs)


def run_one(job: SearchJob, trial: optuna.Trial, rejections_in_a_row: int) -> Outcome:
    """One trial's path, top to bottom: sample a config, estimate it, reject it when it
    breaks a budget; else build, train, prune, fine-tune, export and measure it (run_trial),
    record what its file measured and tell Optuna."""
    settings, budgets = job.settings, job.settings.budgets
    job.reporter.step(trial.number, "sampling its config")
    fidelity = job.fidelity_of(trial)
    write_fidelity(trial, fidelity.rung, fidelity.rungs, fidelity.images, fidelity.seconds)
    # Frozen dataclasses, no torch yet.
    config = sample(trial, job.space, rung_schedule(job.schedule, fidelity))
    expected = estimate(config, settings.file_format)
    latency_objective = "latency_ms" in study_objective_columns(job.study)
    if budgets.latency_ms is not None or latency_objective:
        if job.latency.model is None:
            job.reporter.step(trial.number, "timing a few files for the latency model")
        model = job.latency.get()
        trial.set_user_attr("estimated_latency_ms", round(model.predict(config), 4))
        expected = dataclasses.replace(expected, latency_ms=model.optimistic(config))
    write_estimate(trial, expected)
    over = budgets.excess(
        expected.params, expected.size_kb, expected.macs, expected.ram_kb, expected.latency_ms
    )
    if over:
        return reject(job, trial, expected, over, rejections_in_a_row + 1)
    if job.costs.model is None:
        job.reporter.step(trial.number, "timing a few training steps for the cost model")
    costs = job.costs.refit(read_trials(job.study.get_trials(deepcopy=False)))
    if fidelity.seconds is not None:
        # Its rung's seconds: as many epochs as the cost model fits in them.
        epochs = epochs_for_seconds(
            config, fidelity.seconds,
            lambda sized: costs.predict(work_of(sized, job.data, fidelity.images)),
            MOST_EPOCHS_FACTOR * job.schedule.epochs,
        )  # fmt: skip
        config = dataclasses.replace(config, train=with_epochs(config.train, epochs))
    work = work_of(config, job.data, fidelity.images)
    predicted = costs.predict(work)
    limit = settings.time_limit
    write_prediction(trial, predicted, work.vector(), limit.deadline if limit else None)
    if limit is not None:
        allowance = limit.allowance()
        too_slow = limit.too_slow(predicted)
        # Relative, as the budgets' constraints are; <= 0 for a config given the time.
        trial.set_constraint("seconds", predicted / max(allowance, 1e-9) - 1.0)
        if too_slow:
            return reject_too_slow(job, trial, expected, too_slow)
    if job.display:
        job.display.start_trial(trial.number, config.epochs)
    folder = settings.folder / "trials" / f"{trial.number:05d}"
    stopper = (
        EarlyStopper(
            job.study,
            expected.size_kb,
            budgets,
            fidelity,
            latency_ms=expected.latency_ms if latency_objective else None,
        )  # fmt: skip
        if settings.early_stopping
        else None
    )
    try:
        result = run_trial(
            config, job.data, folder, seed=settings.seed + trial.number,
            on_device=job.data_at(fidelity),
            on_epoch=lambda *done: stop_point(job.display, *done), early_check=stopper,
            distillation=job.distillation,
            on_step=lambda step: job.reporter.step(trial.number, step),
            file_format=settings.file_format,
            pruned_check=lambda pruned: over_after_pruning(pruned, budgets, settings.file_format),
        )  # fmt: skip
    except StoppedEarly as stop:
        write_stopped_early(trial, stop.early_accuracy, str(stop))
        job.study.tell(trial, state=TrialState.PRUNED)
        saved = config.epochs - stop.epochs_done
        return Outcome("stopped early", f"stopped early: {stop}", stop.epochs_done, saved)
    except (TrainingDiverged, torch.OutOfMemoryError) as error:
        reason = f"{type(error).__name__}: {first_line(error)}"
        write_failed(trial, reason, trained=True)
        job.study.tell(trial, state=TrialState.FAIL)
        return Outcome("failed", "failed: " + reason, failure=type(error).__name__)
    except Exception as error:
        # An internal error: the trial records it, then the run stops with it.
        write_failed(trial, f"{type(error).__name__}: {first_line(error)}")
        job.study.tell(trial, state=TrialState.FAIL)
        raise
    job.reporter.step(trial.number, "recording its result")
    record_constraints(
        trial, budgets, result.params, result.size_kb, result.macs, result.ram_kb,
        result.latency_ms,
    )  # fmt: skip
    over = budgets.excess(
        result.params, result.size_kb, result.macs, result.ram_kb, result.latency_ms
    )
    write_result(trial, result, settings.folder, over)
    job.study.tell(
        trial, objective_values(job.study, result.accuracy, result.size_kb, result.latency_ms)
    )
    text = trained_outcome(result, over)
    if fidelity.rungs > 1:
        text = f"{fidelity.describe()}; {text}"
    return Outcome("trained", text, config.epochs, 0, result, feasible=not over, rung=fidelity.rung)


def over_after_pruning(pruned: TrialConfig, budgets: Budgets, file_format: str) -> str | None:
    """Why the widths pruning left break the budgets, or None. Global pruning chooses
    where to cut, so the estimate before training can be far off (a stage it may not
    thin keeps its parameters); the exact figures of the pruned widths stop such a trial
    before its fine-tune."""
    expected = estimate_pruned(pruned, file_format)
    over = budgets.excess(expected.params, expected.size_kb, expected.macs, expected.ram_kb)
    if not over:
        return None
    return "over budget after pruning, before the fine-tune: " + ", ".join(over)


def promote(study: optuna.Study, budgets: Budgets, rungs: int) -> None:
    """Queue a copy at the next rung of every trial that has earned one (to_promote); the
    next study.ask() of any worker takes it before sampling a new config."""
    records = read_trials(study.get_trials(deepcopy=False))
    by_number = {record.number: record for record in records}
    latency = "latency_ms" in study_objective_columns(study)
    for number, rung in to_promote(records, budgets, rungs, latency=latency):
        study.enqueue_trial(
            by_number[number].searched, user_attrs=promoted_attrs(by_number[number], rung)
        )


def stop_reason(counts: SearchCounts, settings: SearchSettings) -> str:
    """Why the search stops before its target, or "" while it goes on."""
    limit = settings.time_limit
    if limit is not None and limit.left() <= 0:
        return "--time reached"
    if counts.too_slow_in_a_row >= MAX_TOO_SLOW_IN_A_ROW:
        return (
            f"{counts.too_slow_in_a_row} sampled configs in a row were predicted too slow "
            f"for the {max(0, limit.left()) if limit else 0:.0f} s left of --time"
        )
    if counts.failures_in_a_row >= settings.max_failures_in_a_row:
        return (
            f"{counts.failures_in_a_row} trials in a row failed, the last with "
            f"{counts.last_failure}; `compsearch show --all` gives each one's reason"
        )
    if counts.rejections_in_a_row >= MAX_REJECTIONS_IN_A_ROW:
        return (
            f"{MAX_REJECTIONS_IN_A_ROW} sampled configs in a row broke the budgets; "
            "relax the budgets or narrow the space to smaller models"
        )
    return ""


def stop_point(display: Display | None, epoch: int, epochs: int, resolution: int) -> None:
    """After each epoch: show it, and stop when a Ctrl-C came whose KeyboardInterrupt was
    lost (see STOP_REQUESTED)."""
    if STOP_REQUESTED.is_set():
        raise KeyboardInterrupt
    if display:
        display.epoch_done(epoch, epochs, resolution)


def abandon(study: optuna.Study, trial: optuna.Trial) -> None:
    """Fail a trial that Ctrl-C interrupted, with the reason, and queue its config to run
    again; nothing when the interrupt came after the storage had its outcome."""
    state = storage_of(study).get_trial(trial_id(trial)).state
    if state != TrialState.RUNNING:
        return
    write_failed(trial, INTERRUPTED)
    Retry()(study, study.tell(trial, state=TrialState.FAIL))


def objective_values(
    study: optuna.Study, accuracy: float, size_kb: float, latency_ms: float
) -> list[float]:
    """What Optuna is told: accuracy and size, and latency when the study has it as a third
    objective (--objectives accuracy,size,latency)."""
    return [accuracy, size_kb, latency_ms][: len(study.directions)]


def untrained_values(study: optuna.Study, expected: Estimate) -> list[float]:
    """Placeholders for a config never trained: accuracy 0, which no table or plot shows,
    its estimated size, and its least latency by estimate (infinite when none was made)."""
    latency = expected.latency_ms if math.isfinite(expected.latency_ms) else math.inf
    return objective_values(study, 0.0, expected.size_kb, latency)


def reject(
    job: SearchJob, trial: optuna.Trial, expected: Estimate, over: list[str], in_a_row: int
) -> Outcome:
    """Record a config that breaks the budgets by estimate; it is never trained. When the
    sampler is stuck (`in_a_row` rejections), queue a copy shrunk to fit.

    The constraint values teach the sampler where the infeasible region is; accuracy 0
    is a placeholder that no table or plot shows.
    """
    budgets, every = job.settings.budgets, job.settings.fit_after_rejections
    record_constraints(
        trial, budgets, expected.params, expected.size_kb, expected.macs, expected.ram_kb,
        expected.latency_ms,
    )  # fmt: skip
    write_rejected(trial, over)
    job.study.tell(trial, untrained_values(job.study, expected))
    fitted = None
    if every > 0 and in_a_row % every == 0 and not is_fitted_copy(trial):
        fitted = fit_to_budget(
            trial.params, job.space, job.schedule, budgets, job.settings.file_format
        )
        if fitted is not None:
            job.study.enqueue_trial(fitted, user_attrs=fitted_attrs(trial.number))
    return Outcome(
        "rejected", "over budget by estimate: " + ", ".join(over), fitted=fitted is not None
    )


def reject_too_slow(
    job: SearchJob, trial: optuna.Trial, expected: Estimate, reason: str
) -> Outcome:
    """Record a config within the budgets that the cost model predicts would not finish
    in the time it may take; it is never trained. Its "seconds" constraint (set by
    run_one) tells the sampler so, apart from the budgets, so that it stays feasible in
    the deployment sense."""
    budgets = job.settings.budgets
    record_constraints(
        trial, budgets, expected.params, expected.size_kb, expected.macs, expected.ram_kb,
        expected.latency_ms,
    )  # fmt: skip
    write_too_slow(trial, reason)
    job.study.tell(trial, untrained_values(job.study, expected))
    return Outcome("too slow", "too slow for the time left: " + reason)


def fit_to_budget(
    params: dict,
    space: SearchSpace,
    schedule: TrainConfig,
    budgets: Budgets,
    file_format: str = "onnx",
) -> dict | None:
    """The proposal's parameters with every width scaled down by the largest common factor
    that meets the budgets (by estimate), after making stages shallower when even the
    narrowest widths do not; None when nothing short of other choices fits."""

    def scaled(base: dict, factor: float) -> tuple[dict, TrialConfig]:
        fitted = dict(base)
        for name, value in base.items():
            if name.endswith("_width"):
                low, _ = space.stem_width if name == "stem_width" else space.width
                fitted[name] = max(low, int(value * factor))
        return fitted, sample(optuna.trial.FixedTrial(fitted), space, schedule)

    def fits(config: TrialConfig) -> bool:
        expected = estimate(config, file_format)
        return not budgets.excess(expected.params, expected.size_kb, expected.macs, expected.ram_kb)

    base = dict(params)
    if not fits(scaled(base, 0.0)[1]):
        # One block per stage; kept only when the narrowest widths then fit.
        for name in base:
            if name.endswith("_depth"):
                base[name] = space.depth[0]
        if not fits(scaled(base, 0.0)[1]):
            return None
    low, high = 0.0, 1.0  # low fits, high may not
    if fits(scaled(base, high)[1]):
        return base
    for _ in range(12):
        middle = (low + high) / 2
        if fits(scaled(base, middle)[1]):
            low = middle
        else:
            high = middle
    return scaled(base, low)[0]


class EarlyStopper:
    """Stops a trial whose early accuracy cannot make it Pareto-optimal at its size.

    Optuna's pruners compare one objective; here the front has two or three. Only trials of
    the same rung are compared (a trial at rung 1 against the others at rung 1). A trial is
    stopped when finished feasible trials no larger than it (and, with latency an
    objective, no slower than the least latency it may have by estimate, `latency_ms`)
    reached an accuracy that it could not reach even if it gained the most any finished
    trial gained after the check, plus a margin. Until enough trials have finished,
    nothing is stopped.
    """

    def __init__(
        self,
        study: optuna.Study,
        size_kb: float,
        budgets: Budgets,
        fidelity: Fidelity | None = None,
        latency_ms: float | None = None,
    ) -> None:
        self.size_kb = size_kb
        # None: latency is no objective; NaN: no estimate, so no trial is known faster.
        self.latency_ms = latency_ms
        self.finished = [  # (early accuracy, final accuracy, size_kb, feasible, latency_ms)
            (
                record.early_accuracy,
                record.accuracy,
                record.size_kb,
                record.feasible(budgets),
                record.latency_ms,
            )  # fmt: skip
            for record in read_trials(study.get_trials(deepcopy=False))
            if record.trained
            and not math.isnan(record.early_accuracy)  # NaN: no check made
            # Like with like: trials trained at the same rung (any, when None).
            and (
                fidelity is None
                or (record.rung, record.rungs) == (fidelity.rung, fidelity.rungs)
                and record.train_images in (None, fidelity.images)  # None: an older study
                and (record.fidelity_seconds is None) == (fidelity.seconds is None)
            )
        ]

    def __call__(self, early_accuracy: float) -> str | None:
        if len(self.finished) < EARLY_STOPPING_MIN_TRIALS:
            return None
        largest_gain = max(final - early for early, final, *_ in self.finished)
        smaller = [
            final
            for _, final, size_kb, feasible, latency_ms in self.finished
            if feasible
            and size_kb <= self.size_kb
            and (self.latency_ms is None or latency_ms <= self.latency_ms)
        ]
        if not smaller:
            return None
        reachable = early_accuracy + largest_gain + EARLY_STOPPING_MARGIN
        best = max(smaller)
        if reachable >= best:
            return None
        return (
            f"validation accuracy {early_accuracy:.2%} after the check could reach at most "
            f"{reachable:.2%}, below {best:.2%} of a finished trial no larger "
            + ("than it" if self.latency_ms is None else "and no slower than it")
        )


def record_constraints(
    trial: optuna.Trial,
    budgets: Budgets,
    params: float,
    size_kb: float,
    macs: float,
    ram_kb: float,
    latency_ms: float,
) -> None:
    for name, value in budgets.constraints(params, size_kb, macs, ram_kb, latency_ms).items():
        trial.set_constraint(name, value)
