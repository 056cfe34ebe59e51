from __future__ import annotations

import optuna
import pytest

from compsearch.spaces.config import TrainConfig
from compsearch.spaces.space import SearchSpace, sample

SCHEDULE = TrainConfig(
    epochs=2,
    finetune_epochs=1,
    train_resolution=8,
    test_resolution=8,
    batch_size=64,
    learning_rate=0.1,
    weight_decay=5e-4,
    label_smoothing=0.1,
)


def sampled_configs(space: SearchSpace, count: int, seed: int):
    """`count` configs drawn by Optuna's RandomSampler from `space`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [sample(study.ask(), space, SCHEDULE) for _ in range(count)]


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
