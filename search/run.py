"""The trial loop: sample, check budgets, train, measure, tell Optuna."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
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
from compsearch.objectives.train import TrainingDiverged
from compsearch.objectives.trial import TrialResult, run_trial
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.config import TrainConfig
from compsearch.spaces.estimate import estimate
from compsearch.spaces.space import SearchSpace, sample

# Stop asking when this many configs in a row break the budgets: the space is then
# almost all infeasible and the user should narrow it or relax the budgets.
MAX_REJECTIONS_IN_A_ROW = 500
INTERRUPTED = "interrupted before it finished"


@dataclass(frozen=True)
class SearchSettings:
    budgets: Budgets
    trials: int  # trained trials to add
    timeout: float | None  # seconds after which no new trial starts
    seed: int
    device: str
    folder: Path  # the study's folder: trial files go below it


@dataclass
class SearchCounts:
    trained: int = 0
    rejected: int = 0  # over budget by estimate, never trained
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
        self.best_accuracy = -1.0
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

    def trial_done(self, counts: SearchCounts, result: TrialResult | None, feasible: bool) -> None:
        if result is not None and feasible and result.accuracy > self.best_accuracy:
            self.best_accuracy = result.accuracy
            self.best = f"{result.accuracy:.2%} @ {result.size_kb:.1f} KB"
        self.progress.update(
            self.trials,
            completed=counts.trained,
            description=f"trials · best {self.best} · {counts.rejected} rejected",
        )
        self.progress.update(self.epochs, visible=False)


def retry_interrupted(study: optuna.Study) -> int:
    """Queue again the configs of trials that an interruption cut short, once each."""
    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    count = 0
    for trial in study.trials:
        interrupted = (
            trial.state == optuna.trial.TrialState.FAIL
            and trial.user_attrs.get("reason") == INTERRUPTED
        )
        if interrupted and trial.number not in retried and trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            count += 1
    return count


def search(
    study: optuna.Study,
    space: SearchSpace,
    schedule: TrainConfig,
    data: Dataset,
    settings: SearchSettings,
    console: Console,
) -> SearchCounts:
    """Add `settings.trials` trained trials to `study` (fewer on timeout or Ctrl-C)."""
    counts = SearchCounts()
    started = time.monotonic()
    rejections_in_a_row = 0
    with Display(console, settings.trials) as display:
        while counts.trained < settings.trials:
            if settings.timeout is not None and time.monotonic() - started > settings.timeout:
                counts.stopped_reason = f"--timeout {settings.timeout:g} s reached"
                break
            if rejections_in_a_row >= MAX_REJECTIONS_IN_A_ROW:
                counts.stopped_reason = (
                    f"{MAX_REJECTIONS_IN_A_ROW} sampled configs in a row broke the budgets; "
                    "relax the budgets or narrow the space to smaller models"
                )
                break
            trial = study.ask()
            config = sample(trial, space, schedule)
            expected = estimate(config)
            trial.set_user_attr("estimated_params", expected.params)
            trial.set_user_attr("estimated_size_kb", expected.size_kb)
            trial.set_user_attr("estimated_macs", expected.macs)
            over = settings.budgets.excess(expected.params, expected.size_kb, expected.macs)
            if over:
                # Never trained: the constraint values teach the sampler where the
                # infeasible region is; accuracy 0 is a placeholder that no plot shows.
                record_constraints(
                    trial, settings.budgets, expected.params, expected.size_kb, expected.macs
                )
                trial.set_user_attr("trained", False)
                trial.set_user_attr("reason", "over budget before training: " + ", ".join(over))
                study.tell(trial, [0.0, expected.size_kb])
                counts.rejected += 1
                rejections_in_a_row += 1
                display.trial_done(counts, None, False)
                continue
            rejections_in_a_row = 0
            display.start_trial(trial.number, config.train.epochs)
            folder = settings.folder / "trials" / f"{trial.number:05d}"
            try:
                result = run_trial(
                    config,
                    data,
                    folder,
                    seed=settings.seed + trial.number,
                    device=settings.device,
                    on_epoch=display.epoch_done,
                )
            except KeyboardInterrupt:
                trial.set_user_attr("reason", INTERRUPTED)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            except (TrainingDiverged, torch.OutOfMemoryError) as error:
                trial.set_user_attr("trained", True)
                trial.set_user_attr("reason", f"{type(error).__name__}: {error}")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                counts.failed += 1
                display.trial_done(counts, None, False)
                continue
            record_constraints(trial, settings.budgets, result.params, result.size_kb, result.macs)
            over = settings.budgets.excess(result.params, result.size_kb, result.macs)
            feasible = not over
            record_result(trial, result, settings.folder)
            if over:
                trial.set_user_attr("reason", "over budget as measured: " + ", ".join(over))
                counts.infeasible_after_training += 1
            study.tell(trial, [result.accuracy, result.size_kb])
            counts.trained += 1
            display.trial_done(counts, result, feasible)
    return counts


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
    trial.set_user_attr("onnx_path", str(result.onnx_path.relative_to(folder)))
    # The deployed config (widths after pruning), from which the model rebuilds.
    trial.set_user_attr("config", result.config.to_dict())
