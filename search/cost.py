"""The cost model: a config's seconds predicted from its work (spaces/cost.py), before it
trains, so that a search given --time starts no trial it cannot finish in time.

Seconds are taken as linear in the work's figures, with non-negative coefficients: a
device's time per multiply-accumulate, per graph node and step, per input value and per
trial. The coefficients are fitted by non-negative least squares on relative errors (a
trial of 2 s mispredicted by 1 s weighs as much as one of 200 s by 100 s), first on a few
timed training epochs of random configs at the start of a run (the calibration), then on
those and every finished trial of the study, refitted after each one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import optuna
from scipy.optimize import nnls

from compsearch.objectives.data import Dataset
from compsearch.objectives.timing import time_training
from compsearch.objectives.train import DeviceData
from compsearch.results.records import TrialRecord
from compsearch.spaces.config import TrainConfig, TrialConfig
from compsearch.spaces.cost import Work, probe_work, training_work
from compsearch.spaces.space import SearchSpace, sample

# The calibration: this many random configs of the space, each timed on this many
# training batches at its sampled training resolution (a few seconds in all on two CPU
# cores for CIFAR-10's shapes).
PROBES = 4
PROBE_BATCHES = 4
# A search gives no single trial more than this share of --time, so that it gets several
# looks at the space rather than one.
MAX_TRIAL_SHARE = 1 / 3


@dataclass(frozen=True)
class Observation:
    work: Work
    seconds: float


@dataclass(frozen=True)
class CostModel:
    """Seconds per unit of each of Work's figures, and what they were fitted on."""

    coefficients: tuple[float, ...]
    calibration: tuple[Observation, ...] = ()
    trials_fitted: int = 0

    def predict(self, work: Work) -> float:
        return float(np.dot(self.coefficients, work.vector()))

    @classmethod
    def fit(cls, calibration: Iterable[Observation], trials: Iterable[Observation] = ()):
        """Non-negative least squares on the relative errors of every observation."""
        calibration, trials = tuple(calibration), tuple(trials)
        rows = [o for o in calibration + trials if o.seconds > 0]
        if not rows:
            raise ValueError("the cost model needs at least one timed observation")
        matrix = np.array([o.work.vector() for o in rows], dtype=float)
        seconds = np.array([o.seconds for o in rows], dtype=float)
        # Columns scaled to comparable sizes (MACs x images run to 1e12, trials to 1), so
        # that the solver's tolerance means the same for every coefficient.
        scale = np.abs(matrix).max(axis=0)
        scale[scale == 0] = 1.0
        weighted = matrix / scale / seconds[:, None]
        solution, _ = nnls(weighted, np.ones(len(rows)))
        return cls(tuple(float(c) for c in solution / scale), calibration, len(trials))

    def refit(self, records: Iterable[TrialRecord]) -> CostModel:
        """The model fitted again on the calibration and every trial trained to the end
        that recorded its work."""
        trials = [
            Observation(Work.of(record.work), record.seconds)
            for record in records
            if record.trained and record.work is not None and record.seconds > 0
        ]
        if len(trials) == self.trials_fitted:
            return self
        return CostModel.fit(self.calibration, trials)


def calibrate(
    space: SearchSpace,
    schedule: TrainConfig,
    data: Dataset,
    on_device: DeviceData,
    seed: int,
    records: Iterable[TrialRecord] = (),
) -> CostModel:
    """Time PROBES random configs of `space` for PROBE_BATCHES batches each on this device
    and fit the model to them (and to `records`, the study's finished trials)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    images = schedule.batch_size * PROBE_BATCHES
    observations = []
    with optuna_quiet():
        for index in range(PROBES):
            config = sample(study.ask(), space, schedule)
            resolution = config.train.train_resolution
            seconds = time_training(config, on_device, resolution, images, seed + index)
            work = probe_work(config, images, resolution, data.resolution, data.channels)
            observations.append(Observation(work, seconds))
    return CostModel.fit(observations).refit(records)


@contextlib.contextmanager
def optuna_quiet() -> Iterator[None]:
    """Optuna's info messages off for the probes' throwaway study."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def work_of(config: TrialConfig, data: Dataset, train_images: int | None = None) -> Work:
    """The work of a trial of `config` on `train_images` of `data`'s training images (all
    of them when None)."""
    images = len(data.train) if train_images is None else train_images
    return training_work(config, images, len(data.val), data.resolution, data.channels)


@dataclass(frozen=True)
class TimeLimit:
    """A run's --time: the wall-clock deadline (time.time()) by which every trial is to
    end, and the longest any one trial may take."""

    deadline: float
    longest: float

    @classmethod
    def after(cls, seconds: float, start: float | None = None) -> TimeLimit:
        start = time.time() if start is None else start
        return cls(start + seconds, MAX_TRIAL_SHARE * seconds)

    def left(self, now: float | None = None) -> float:
        return self.deadline - (time.time() if now is None else now)

    def allowance(self, now: float | None = None) -> float:
        """The seconds a trial starting now may take."""
        return min(self.longest, self.left(now))

    def too_slow(self, predicted: float, now: float | None = None) -> str:
        """Why a trial predicted to take `predicted` seconds may not start now, or ""."""
        left = self.left(now)
        if predicted > left:
            return f"predicted {predicted:.0f} s, {max(left, 0):.0f} s left before --time ends"
        if predicted > self.longest:
            return (
                f"predicted {predicted:.0f} s, more than {MAX_TRIAL_SHARE:.0%} of --time "
                f"({self.longest:.0f} s), the most one trial may take"
            )
        return ""
