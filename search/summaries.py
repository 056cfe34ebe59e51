"""What each job returns to its caller, the command line or a Python program. Plain data:
the command line turns it into text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compsearch.results.records import PredictionErrors, TrialRecord, best_feasible
from compsearch.search.common import EXIT_INTERRUPTED
from compsearch.spaces.budgets import Budgets

if TYPE_CHECKING:
    import pandas as pd

    from compsearch.search.loop import SearchCounts


@dataclass(frozen=True)
class StudyView:
    """A study as it stands: every trial's record and the feasible Pareto front."""

    name: str
    budgets: Budgets
    folder: Path
    records: tuple[TrialRecord, ...]
    front: tuple[TrialRecord, ...]  # feasible, not beaten on accuracy and size; best first
    frame: pd.DataFrame  # one row per trial, the columns of trials.csv

    @property
    def title(self) -> str:
        return f"{self.name} ({self.budgets.describe()})"

    @property
    def best(self) -> TrialRecord | None:
        """The most accurate feasible trial (the smaller file on a tie): what
        `export --trial best` exports."""
        return best_feasible(self.records, self.budgets)

    @property
    def prediction_errors(self) -> PredictionErrors | None:
        """How far the cost model's seconds were from the trials' measured seconds."""
        return PredictionErrors.of(self.records)


@dataclass(frozen=True)
class RunSummary:
    """What `run` did. `counts` is None when it was interrupted (Ctrl-C, SIGTERM): the
    study then keeps every finished trial, and `view` shows them."""

    study: str
    storage: str  # the storage's URL, any password replaced
    folder: Path
    seconds: float
    counts: SearchCounts | None
    view: StudyView | None  # None for a worker process other than the first
    written: tuple[Path, ...]  # trials.csv, figures, report.html
    failed_workers: int = 0

    @property
    def interrupted(self) -> bool:
        return self.counts is None

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return 1 if self.failed_workers else 0


@dataclass(frozen=True)
class ExportSummary:
    """What `export` wrote: `folder` holds model.onnx, model.pt and model.json, whose
    content `card` is."""

    folder: Path
    card: dict[str, Any]
    budgets: Budgets
    report: Path
