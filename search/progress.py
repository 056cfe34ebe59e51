"""What a run shows while it works: trials done, the current trial's epochs, the best
feasible trial so far; one line per trial where the output is a log file, not a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from compsearch.objectives.trial import TrialResult


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
        finished: int,
        rejected: int,
        number: int,
        outcome: str,
        result: TrialResult | None = None,
        feasible: bool = False,
    ) -> None:
        """Show a trial's end (`finished` trials so far, `rejected` configs); where the
        output is not a terminal (a log file), where progress bars do not show, also print
        one line with its `outcome`."""
        if result is not None and feasible:
            key = (result.accuracy, -result.size_kb)  # on a tie in accuracy, the smaller
            if key > self.best_key:
                self.best_key = key
                self.best = f"{result.accuracy:.2%} @ {result.size_kb:.1f} KB"
        self.progress.update(
            self.trials,
            completed=finished,
            description=f"trials · best {self.best} · {rejected} rejected",
        )
        self.progress.update(self.epochs, visible=False)
        if not self.progress.console.is_terminal:
            self.progress.console.print(
                f"trial {number}: {outcome} · best {self.best}", soft_wrap=True, highlight=False
            )
