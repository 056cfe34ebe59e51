"""Many cheap looks, few expensive ones: successive halving for several objectives.

A fidelity is how much training a trial gets: its epochs and how many of the run's
training images it draws on. A run has a ladder of them (`--rungs`, default DEFAULT_RUNGS), each
rung ETA times the training of the one below (images x epochs), the top one being
`--epochs` on all of the run's training images (`--subset`). Every sampled config starts
at the bottom rung. As trials finish, the ones that are non-dominated among the trials
of their rung (accuracy up, file size down, within the budgets) are promoted: their
config is queued as a new trial at the next rung (`promoted_from` says which trial it
continues). Of every ETA trials that finish at a rung, one goes up, as in asynchronous
successive halving: a worker never waits for a rung to fill.

Optuna's pruners rank by one objective; here the rank is the Pareto order (non-dominated
sorting), and within one front the more accurate trial first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from compsearch.results.records import TrialRecord
from compsearch.search.common import DEFAULT_RUNGS
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.config import TrainConfig

ETA = 3
MIN_EPOCHS = 2  # one to train at the low resolution, one to fine-tune at the test one
# A rung's training set is never smaller than this many images per class.
MIN_IMAGES_PER_CLASS = 20


@dataclass(frozen=True)
class Fidelity:
    """One rung of the ladder: `epochs` over `images` training images."""

    rung: int
    rungs: int
    epochs: int
    images: int

    @property
    def top(self) -> bool:
        return self.rung == self.rungs - 1

    def describe(self) -> str:
        return f"rung {self.rung + 1}/{self.rungs}: {self.epochs} epochs of {self.images:,} images"


def ladder(
    epochs: int, images: int, classes: int, rungs: int = DEFAULT_RUNGS, eta: int = ETA
) -> tuple[Fidelity, ...]:
    """The run's fidelities, the cheapest first. Rung r trains eta^-(rungs-1-r) of the
    top rung's images x epochs: the epochs are cut first (down to MIN_EPOCHS), then the
    images (down to MIN_IMAGES_PER_CLASS per class). Rungs that these floors make equal
    to the one above are left out, so a short schedule on few images has fewer rungs.
    bench/fidelity_ranking.py found equal seconds per config ranking better than equal
    epochs, on six configs (see the README); the rungs do not count seconds yet."""
    least = min(images, MIN_IMAGES_PER_CLASS * classes)
    shapes: list[tuple[int, int]] = []
    for rung in range(rungs):
        share = float(eta) ** -(rungs - 1 - rung)
        rung_epochs = max(MIN_EPOCHS, min(epochs, round(epochs * share)))
        rung_images = max(least, min(images, round(images * epochs * share / rung_epochs)))
        if (rung_epochs, rung_images) not in shapes:
            shapes.append((rung_epochs, rung_images))
    return tuple(
        Fidelity(rung, len(shapes), rung_epochs, rung_images)
        for rung, (rung_epochs, rung_images) in enumerate(shapes)
    )


def rung_schedule(schedule: TrainConfig, fidelity: Fidelity) -> TrainConfig:
    """`schedule` cut to the rung's epochs: a quarter of them (at least one) fine-tune."""
    return dataclasses.replace(
        schedule,
        epochs=fidelity.epochs,
        finetune_epochs=max(1, round(fidelity.epochs * 0.25)),
    )


def pareto_order(points: Sequence[tuple[int, float, float]]) -> list[int]:
    """Trial numbers of (number, accuracy, size_kb) points by non-dominated sorting: the
    first front, then the front of what is left, and so on; within a front the more
    accurate first, then the smaller, then the earlier."""
    left = list(points)
    order: list[int] = []
    while left:
        front = [
            p for p in left
            if not any(
                q[1] >= p[1] and q[2] <= p[2] and (q[1] > p[1] or q[2] < p[2]) for q in left
            )
        ]  # fmt: skip
        front.sort(key=lambda p: (-p[1], p[2], p[0]))
        order += [p[0] for p in front]
        chosen = {p[0] for p in front}
        left = [p for p in left if p[0] not in chosen]
    return order


def to_promote(
    records: Iterable[TrialRecord], budgets: Budgets, rungs: int, eta: int = ETA
) -> list[tuple[int, int]]:
    """(trial number, rung it goes to) for every trial that has earned a promotion and has
    not had one yet: among the feasible trials trained at a rung below the top, the first
    len // eta of them in Pareto order. A trial promoted already (its copy queued, running,
    finished or failed) is not promoted again."""
    records = list(records)
    promoted = {record.promoted_from for record in records if record.promoted_from is not None}
    chosen = []
    for rung in range(rungs - 1):
        finished = [
            (record.number, record.accuracy, record.size_kb)
            for record in records
            if record.rung == rung and record.rungs == rungs and record.feasible(budgets)
        ]
        best = pareto_order(finished)[: len(finished) // eta]
        chosen += [(number, rung + 1) for number in best if number not in promoted]
    return chosen
