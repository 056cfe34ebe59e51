"""Many cheap looks, few expensive ones: successive halving for several objectives.

A fidelity is how much training a trial gets. A run has a ladder of them (`--rungs`,
default DEFAULT_RUNGS), each rung ETA times the training of the one below, counted one of
two ways (`--fidelity`):

- `epochs` (the default): a rung is a number of epochs on a number of the run's training
  images (images x epochs), the top one being `--epochs` on all of them (`--subset`);
- `seconds`: a rung is a number of predicted training seconds on all of the run's
  training images, the same for every config at that rung, so that a fast network trains
  more epochs than a slow one, as it will when the export gives the winner a fixed time.
  The top rung's seconds are what a typical config of the space (the median of
  REFERENCE_CONFIGS random ones within the budgets) takes for `--epochs` epochs, by the
  cost model. Each trial's epochs are sized by the cost model to its rung's seconds.

Every sampled config starts
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
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import optuna

from compsearch.results.records import TrialRecord
from compsearch.search.common import DEFAULT_RUNGS
from compsearch.search.cost import optuna_quiet
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.config import TrainConfig, TrialConfig
from compsearch.spaces.estimate import estimate
from compsearch.spaces.space import SearchSpace, sample

ETA = 3
# Counted in seconds, the top rung gives every config what the median of this many random
# configs of the space (within the budgets) takes for --epochs epochs.
REFERENCE_CONFIGS = 16
REFERENCE_DRAWS = 400  # proposals drawn at most to find them
# ... and no trial more than this many times --epochs, however fast it is.
MOST_EPOCHS_FACTOR = 8
MIN_EPOCHS = 2  # one to train at the low resolution, one to fine-tune at the test one
# A rung's training set is never smaller than this many images per class.
MIN_IMAGES_PER_CLASS = 20


@dataclass(frozen=True)
class Fidelity:
    """One rung of the ladder: `epochs` over `images` training images, or, when `seconds`
    is set, that many predicted seconds of training on `images` images (`epochs` is then
    the schedule's, and each trial's own epochs are sized to the seconds)."""

    rung: int
    rungs: int
    epochs: int
    images: int
    seconds: float | None = None

    @property
    def top(self) -> bool:
        return self.rung == self.rungs - 1

    def describe(self) -> str:
        rung = f"rung {self.rung + 1}/{self.rungs}"
        if self.seconds is not None:
            return f"{rung}: {self.seconds:.0f} s on {self.images:,} images"
        return f"{rung}: {self.epochs} epochs of {self.images:,} images"


def ladder(
    epochs: int, images: int, classes: int, rungs: int = DEFAULT_RUNGS, eta: int = ETA
) -> tuple[Fidelity, ...]:
    """The run's fidelities, the cheapest first. Rung r trains eta^-(rungs-1-r) of the
    top rung's images x epochs: the epochs are cut first (down to MIN_EPOCHS), then the
    images (down to MIN_IMAGES_PER_CLASS per class). Rungs that these floors make equal
    to the one above are left out, so a short schedule on few images has fewer rungs.
    For rungs counted in seconds, see `seconds_ladder`."""
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


def seconds_ladder(
    top_seconds: float, epochs: int, images: int, rungs: int = DEFAULT_RUNGS, eta: int = ETA
) -> tuple[Fidelity, ...]:
    """The run's fidelities counted in seconds, the cheapest first: rung r gives every
    config eta^-(rungs-1-r) of `top_seconds` on all `images` training images."""
    return tuple(
        Fidelity(rung, rungs, epochs, images, top_seconds * float(eta) ** -(rungs - 1 - rung))
        for rung in range(rungs)
    )


def reference_seconds(
    space: SearchSpace,
    schedule: TrainConfig,
    budgets: Budgets,
    predict: Callable[[TrialConfig], float],
    seed: int,
    file_format: str = "onnx",
) -> float:
    """The median predicted seconds of REFERENCE_CONFIGS random configs of `space` within
    the budgets (by estimate), each trained on `schedule`: the top rung's seconds when the
    rungs count seconds. When too few of the first proposals fit, those that do (or, with
    none, all of them) are used."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    fitting, drawn = [], []
    with optuna_quiet():
        for _ in range(REFERENCE_DRAWS):
            config = sample(study.ask(), space, schedule)
            drawn.append(config)
            expected = estimate(config, file_format)
            if not budgets.excess(
                expected.params, expected.size_kb, expected.macs, expected.ram_kb
            ):
                fitting.append(config)
                if len(fitting) == REFERENCE_CONFIGS:
                    break
    return statistics.median(predict(config) for config in fitting or drawn)


def with_epochs(schedule: TrainConfig, epochs: int) -> TrainConfig:
    """`schedule` with `epochs` epochs: a quarter of them (at least one) fine-tune."""
    return dataclasses.replace(
        schedule, epochs=epochs, finetune_epochs=max(1, round(epochs * 0.25))
    )


def rung_schedule(schedule: TrainConfig, fidelity: Fidelity) -> TrainConfig:
    """`schedule` cut to the rung's epochs (unchanged for a rung counted in seconds, whose
    trials are sized one by one: `epochs_for_seconds`)."""
    if fidelity.seconds is not None:
        return schedule
    return with_epochs(schedule, fidelity.epochs)


def epochs_for_seconds(
    config: TrialConfig, seconds: float, predict: Callable[[TrialConfig], float], most: int
) -> int:
    """The most epochs (MIN_EPOCHS to `most`) whose trial `predict` gives at most
    `seconds`; MIN_EPOCHS when even those take longer. Predicted seconds grow with the
    epochs, so a bisection finds it."""

    def fits(epochs: int) -> bool:
        sized = dataclasses.replace(config, train=with_epochs(config.train, epochs))
        return predict(sized) <= seconds

    if not fits(MIN_EPOCHS):
        return MIN_EPOCHS
    low, high = MIN_EPOCHS, max(MIN_EPOCHS, most)  # low fits
    if fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def pareto_order(points: Sequence[tuple[float, ...]]) -> list[int]:
    """Trial numbers of (number, accuracy, size_kb[, latency_ms]) points by non-dominated
    sorting: the first front, then the front of what is left, and so on; within a front
    the more accurate first, then the smaller, then the faster, then the earlier."""

    def costs(point: tuple[float, ...]) -> tuple[float, ...]:  # all to be minimized
        return (-point[1], *point[2:])

    def dominates(q: tuple[float, ...], p: tuple[float, ...]) -> bool:
        return all(a <= b for a, b in zip(costs(q), costs(p), strict=True)) and costs(q) != costs(p)

    left = list(points)
    order: list[int] = []
    while left:
        front = [p for p in left if not any(dominates(q, p) for q in left)]
        front.sort(key=lambda p: (*costs(p), p[0]))
        order += [int(p[0]) for p in front]
        chosen = {p[0] for p in front}
        left = [p for p in left if p[0] not in chosen]
    return order


def to_promote(
    records: Iterable[TrialRecord],
    budgets: Budgets,
    rungs: int,
    eta: int = ETA,
    latency: bool = False,
) -> list[tuple[int, int]]:
    """(trial number, rung it goes to) for every trial that has earned a promotion and has
    not had one yet: among the feasible trials trained at a rung below the top, the first
    len // eta of them in Pareto order (of accuracy and size, and latency when `latency`).
    A trial promoted already (its copy queued, running, finished or failed) is not
    promoted again."""
    records = list(records)
    promoted = {record.promoted_from for record in records if record.promoted_from is not None}
    chosen = []
    for rung in range(rungs - 1):
        finished = [
            (record.number, record.accuracy, record.size_kb)
            + ((record.latency_ms,) if latency else ())
            for record in records
            if record.rung == rung and record.rungs == rungs and record.feasible(budgets)
        ]
        best = pareto_order(finished)[: len(finished) // eta]
        chosen += [(number, rung + 1) for number in best if number not in promoted]
    return chosen
