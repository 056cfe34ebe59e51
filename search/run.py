"""The trial loop: sample, check budgets, train, measure, tell Optuna."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from compsearch.objectives.data import Dataset
from compsearch.objectives.train import DeviceData, Distillation, TrainingDiverged
from compsearch.objectives.trial import StoppedEarly, TrialResult, run_trial
from compsearch.search.optuna_private import heartbeat_thread, storage_of, trial_id
from compsearch.search.study import Retry, first_line
from compsearch.search.supervise import STOP_REQUESTED, Reporter
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.config import TrainConfig, TrialConfig
from compsearch.spaces.estimate import estimate
from compsearch.spaces.space import SearchSpace, sample

# Stop asking when this many configs in a row break the budgets: the space is then
# almost all infeasible and the user should narrow it or relax the budgets.
MAX_REJECTIONS_IN_A_ROW = 500
MAX_FAILURES_IN_A_ROW = 10
INTERRUPTED = "interrupted before it finished (Ctrl-C)"
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
    timeout: float | None  # seconds after which no new trial starts
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


@dataclass
class SearchCounts:
    trained: int = 0
    rejected: int = 0  # over budget by estimate, never trained
    fitted: int = 0  # shrunk copies of rejected configs queued to fit the budgets
    stopped_early: int = 0
    epochs_trained: int = 0
    epochs_saved: int = 0  # by early stopping
    failed: int = 0
    infeasible_after_training: int = 0
    stopped_reason: str = ""


class Display:
    """Rich progress: trials done, the current trial's epoch, the best feasible so far."""

    def __init__(self, console: Console, trials: int) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.trials = self.progress.add_task("trials", total=trials)
        self.epochs: TaskID = self.progress.add_task("epochs", total=1, visible=False)
        self.best = "none yet"
        self.best_key = (-1.0, 0.0)
        self.trial_number = -1

    def __enter__(self) -> Display:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def start_trial(self, number: int, epochs: int) -> None:
        self.trial_number = number
        self.progress.reset(self.epochs, total=epochs, visible=True)
        self.progress.update(self.epochs, description=f"trial {number} epochs")

    def epoch_done(self, epoch: int, epochs: int, resolution: int) -> None:
        description = f"trial {self.trial_number} epochs @ {resolution}px"
        self.progress.update(self.epochs, advance=1, description=description)

    def trial_done(
        self,
        counts: SearchCounts,
        number: int,
        outcome: str,
        result: TrialResult | None = None,
        feasible: bool = False,
    ) -> None:
        """Count a trial; where the output is not a terminal (a log file), where progress
        bars do not show, also print one line with its `outcome`."""
        if result is not None and feasible:
            key = (result.accuracy, -result.size_kb)  # on a tie in accuracy, the smaller
            if key > self.best_key:
                self.best_key = key
                self.best = f"{result.accuracy:.2%} @ {result.size_kb:.1f} KB"
        self.progress.update(
            self.trials,
            completed=counts.trained + counts.stopped_early,
            description=f"trials · best {self.best} · {counts.rejected} rejected",
        )
        self.progress.update(self.epochs, visible=False)
        if not self.progress.console.is_terminal:
            self.progress.console.print(
                f"trial {number}: {outcome} · best {self.best}", soft_wrap=True, highlight=False
            )


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
    finished = running = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.PRUNED or (
            trial.state == TrialState.COMPLETE and trial.user_attrs.get("trained")
        ):
            finished += 1
        elif trial.state == TrialState.RUNNING:
            running += 1
    return finished, running


def waiting_trials(study: optuna.Study) -> int:
    """Configs queued to run again after their worker was interrupted or lost."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


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
    reporter = reporter or Reporter(None)
    counts = SearchCounts()
    started = time.monotonic()
    # The data on the training device, once: every trial trains from it.
    on_device = on_device or DeviceData(data, settings.device)
    rejections_in_a_row = 0
    failures_in_a_row = 0
    last_failure = ""
    display = Display(console, settings.trials) if console is not None else None
    fail_stale_trials(study)
    finish_at = settings.finish_at
    if finish_at is None:
        finish_at = finished_and_running(study)[0] + settings.trials
    with display or contextlib.nullcontext(), warnings.catch_warnings():
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
            if settings.timeout is not None and time.monotonic() - started > settings.timeout:
                counts.stopped_reason = f"--timeout {settings.timeout:g} s reached"
                break
            if failures_in_a_row >= settings.max_failures_in_a_row:
                counts.stopped_reason = (
                    f"{failures_in_a_row} trials in a row failed, the last with {last_failure}; "
                    "`compsearch show --all` gives each one's reason"
                )
                break
            if rejections_in_a_row >= MAX_REJECTIONS_IN_A_ROW:
                counts.stopped_reason = (
                    f"{MAX_REJECTIONS_IN_A_ROW} sampled configs in a row broke the budgets; "
                    "relax the budgets or narrow the space to smaller models"
                )
                break
            trial = study.ask()
            reporter.step(trial.number, "sampling its config")
            try:
                trial.set_user_attr("worker", WORKER)
                with heartbeat(study, trial):
                    config = sample(trial, space, schedule)
                    expected = estimate(config)
                    trial.set_user_attr("estimated_params", expected.params)
                    trial.set_user_attr("estimated_size_kb", expected.size_kb)
                    trial.set_user_attr("estimated_macs", expected.macs)
                    over = settings.budgets.excess(expected.params, expected.size_kb, expected.macs)
                    if over:
                        reject(study, trial, settings.budgets, expected, over)
                        reporter.done(trial.number, "rejected")
                        counts.rejected += 1
                        rejections_in_a_row += 1
                        stuck = (
                            settings.fit_after_rejections > 0
                            and rejections_in_a_row % settings.fit_after_rejections == 0
                        )
                        if stuck and "fitted_from" not in trial.user_attrs:
                            fitted = fit_to_budget(trial.params, space, schedule, settings.budgets)
                            if fitted is not None:
                                study.enqueue_trial(
                                    fitted, user_attrs={"fitted_from": trial.number}
                                )
                                counts.fitted += 1
                        if display:
                            display.trial_done(
                                counts, trial.number, "over budget by estimate: " + ", ".join(over)
                            )
                        continue
                    rejections_in_a_row = 0
                    if display:
                        display.start_trial(trial.number, config.train.epochs)
                    folder = settings.folder / "trials" / f"{trial.number:05d}"
                    stopper = (
                        EarlyStopper(study, expected.size_kb, settings.budgets)
                        if settings.early_stopping
                        else None
                    )
                    try:
                        result = run_trial(
                            config,
                            data,
                            folder,
                            seed=settings.seed + trial.number,
                            on_device=on_device,
                            on_epoch=lambda *done: stop_point(display, *done),
                            early_check=stopper,
                            distillation=distillation,
                            on_step=lambda step, number=trial.number: reporter.step(number, step),
                        )
                    except StoppedEarly as stop:
                        trial.set_user_attr("trained", False)
                        trial.set_user_attr("early_accuracy", stop.early_accuracy)
                        trial.set_user_attr("reason", f"stopped early: {stop}")
                        study.tell(trial, state=TrialState.PRUNED)
                        reporter.done(trial.number, "stopped early")
                        counts.stopped_early += 1
                        counts.epochs_trained += stop.epochs_done
                        counts.epochs_saved += config.train.epochs - stop.epochs_done
                        if display:
                            display.trial_done(counts, trial.number, f"stopped early: {stop}")
                        continue
                    except (TrainingDiverged, torch.OutOfMemoryError) as error:
                        trial.set_user_attr("trained", True)
                        trial.set_user_attr(
                            "reason", f"{type(error).__name__}: {first_line(error)}"
                        )
                        study.tell(trial, state=TrialState.FAIL)
                        reporter.done(trial.number, "failed")
                        counts.failed += 1
                        failures_in_a_row += 1
                        last_failure = type(error).__name__
                        if display:
                            display.trial_done(
                                counts, trial.number, "failed: " + trial.user_attrs["reason"]
                            )
                        continue
                    except Exception as error:
                        # An internal error: the trial records it, then the run stops with it.
                        trial.set_user_attr(
                            "reason", f"{type(error).__name__}: {first_line(error)}"
                        )
                        study.tell(trial, state=TrialState.FAIL)
                        raise
                    failures_in_a_row = 0
                    reporter.step(trial.number, "recording its result")
                    record_constraints(
                        trial, settings.budgets, result.params, result.size_kb, result.macs
                    )
                    over = settings.budgets.excess(result.params, result.size_kb, result.macs)
                    feasible = not over
                    record_result(trial, result, settings.folder)
                    if over:
                        trial.set_user_attr("reason", "over budget as measured: " + ", ".join(over))
                        counts.infeasible_after_training += 1
                    study.tell(trial, [result.accuracy, result.size_kb])
                    reporter.done(trial.number, "trained")
                    counts.trained += 1
                    counts.epochs_trained += config.train.epochs
                    if display:
                        outcome = trained_outcome(result, over)
                        display.trial_done(counts, trial.number, outcome, result, feasible)
            except KeyboardInterrupt:
                # Wherever in the trial Ctrl-C came: sampling, training, measuring or
                # telling the storage.
                abandon(study, trial)
                raise
    return counts


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
    trial.set_user_attr("reason", INTERRUPTED)
    Retry()(study, study.tell(trial, state=TrialState.FAIL))


def reject(
    study: optuna.Study, trial: optuna.Trial, budgets: Budgets, expected, over: list[str]
) -> None:
    """Record a config that breaks the budgets by estimate; it is never trained.

    The constraint values teach the sampler where the infeasible region is; accuracy 0
    is a placeholder that no table or plot shows.
    """
    record_constraints(trial, budgets, expected.params, expected.size_kb, expected.macs)
    trial.set_user_attr("trained", False)
    trial.set_user_attr("reason", "over budget before training: " + ", ".join(over))
    study.tell(trial, [0.0, expected.size_kb])


def fit_to_budget(
    params: dict, space: SearchSpace, schedule: TrainConfig, budgets: Budgets
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
        expected = estimate(config)
        return not budgets.excess(expected.params, expected.size_kb, expected.macs)

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

    Optuna's pruners compare one objective; here the front has two. A trial is stopped
    when finished feasible trials no larger than it reached an accuracy that it could not
    reach even if it gained the most any finished trial gained after the check, plus a
    margin. Until enough trials have finished, nothing is stopped.
    """

    def __init__(self, study: optuna.Study, size_kb: float, budgets: Budgets) -> None:
        self.size_kb = size_kb
        finished = []
        for trial in study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]):
            attrs = trial.user_attrs
            if not attrs.get("trained") or "early_accuracy" not in attrs:
                continue
            early = attrs["early_accuracy"]
            if early is None or math.isnan(early):  # no check was made
                continue
            feasible = not budgets.excess(attrs["params"], attrs["size_kb"], attrs["macs"])
            finished.append((early, trial.values[0], attrs["size_kb"], feasible))
        self.finished = finished

    def __call__(self, early_accuracy: float) -> str | None:
        if len(self.finished) < EARLY_STOPPING_MIN_TRIALS:
            return None
        largest_gain = max(final - early for early, final, _, _ in self.finished)
        smaller = [
            final
            for _, final, size_kb, feasible in self.finished
            if feasible and size_kb <= self.size_kb
        ]
        if not smaller:
            return None
        reachable = early_accuracy + largest_gain + EARLY_STOPPING_MARGIN
        best = max(smaller)
        if reachable >= best:
            return None
        return (
            f"validation accuracy {early_accuracy:.2%} after the check could reach at most "
            f"{reachable:.2%}, below {best:.2%} of a finished trial no larger than it"
        )


def record_constraints(
    trial: optuna.Trial, budgets: Budgets, params: float, size_kb: float, macs: float
) -> None:
    for name, value in budgets.constraints(params, size_kb, macs).items():
        trial.set_constraint(name, value)


def record_result(trial: optuna.Trial, result: TrialResult, folder: Path) -> None:
    trial.set_user_attr("trained", True)
    trial.set_user_attr("params", result.params)
    trial.set_user_attr("size_kb", result.size_kb)
    trial.set_user_attr("macs", result.macs)
    trial.set_user_attr("seconds", round(result.seconds, 3))
    trial.set_user_attr("accuracy_before_compression", result.accuracy_before_compression)
    trial.set_user_attr("accuracy_post_training", result.accuracy_post_training)
    trial.set_user_attr("quantization_aware", result.quantization_aware)
    trial.set_user_attr("early_accuracy", result.early_accuracy)
    trial.set_user_attr("onnx_path", str(result.onnx_path.relative_to(folder)))
    # The deployed config (widths after pruning), from which the model rebuilds.
    trial.set_user_attr("config", result.config.to_dict())
