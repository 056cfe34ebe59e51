"""Every use of Optuna's private interfaces, in one place.

Optuna gives an ask-and-tell loop no public way to run its heartbeat, and journal storages
no heartbeat at all; both need its private heartbeat interface. pyproject.toml bounds
optuna to the major version these were written against, and tests/test_optuna_private.py
fails when a release changes any of them.
"""

from __future__ import annotations

import optuna
from optuna.storages import BaseStorage

# The interface RDBStorage implements and fail_stale_trials works through. A subclass
# implements its abstract methods, STALE_TRIAL_IDS among them.
from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread
from optuna.trial import FrozenTrial

__all__ = [
    "BaseHeartbeat",
    "STALE_TRIAL_IDS",
    "fixed_params",
    "heartbeat_thread",
    "storage_of",
    "trial_id",
]

# BaseHeartbeat's abstract method that lists a study's trials whose worker went silent.
STALE_TRIAL_IDS = "_get_stale_trial_ids"


def storage_of(study: optuna.Study) -> BaseStorage:
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (unique across studies), which its methods take."""
    return trial._trial_id


def fixed_params(trial: FrozenTrial) -> dict | None:
    """The params a trial took from the queue (enqueue_trial), None when it was sampled."""
    return trial.system_attrs.get("fixed_params")


def heartbeat_thread(study: optuna.Study, trial: optuna.Trial):
    """A context manager that beats for `trial` every heartbeat interval of the study's
    storage, as study.optimize does; nothing when the storage keeps no heartbeat."""
    return get_heartbeat_thread(trial_id(trial), storage_of(study))
