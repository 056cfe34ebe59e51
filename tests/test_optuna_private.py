"""The private parts of Optuna that search/optuna_private.py relies on: each test fails when
an Optuna release changes one of them."""

from __future__ import annotations

import inspect
import threading
import time

import optuna
from optuna.storages import BaseStorage

from compsearch.search.optuna_private import (
    STALE_TRIAL_IDS,
    BaseHeartbeat,
    fixed_params,
    heartbeat_thread,
    storage_of,
    trial_id,
)
from compsearch.search.study import HeartbeatJournalStorage, Retry, open_storage


def test_the_heartbeat_interface_has_the_methods_the_journal_storage_implements():
    assert BaseHeartbeat.__abstractmethods__ == {
        "record_heartbeat",
        STALE_TRIAL_IDS,
        "get_heartbeat_interval",
        "get_heartbeat_stale_trial_callback",
    }
    assert list(inspect.signature(getattr(BaseHeartbeat, STALE_TRIAL_IDS)).parameters) == [
        "self",
        "study_id",
    ]
    # Every abstract method is implemented: the class can be made.
    assert not HeartbeatJournalStorage.__abstractmethods__
    assert isinstance(optuna.storages.RDBStorage("sqlite://"), BaseHeartbeat)


def test_a_study_and_its_trials_expose_the_storage_and_the_storage_ids(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'a.db'}")
    other = optuna.create_study(storage=storage_of(study))
    assert isinstance(storage_of(study), BaseStorage)
    first = other.ask()
    trial = study.ask()
    study_id = storage_of(study).get_study_id_from_name(study.study_name)
    expected = storage_of(study).get_trial_id_from_study_id_trial_number(study_id, trial.number)
    assert trial_id(trial) == expected != trial_id(first)
    assert trial_id(study.trials[0]) == expected  # a FrozenTrial too


def test_the_heartbeat_thread_beats_while_it_runs_and_stale_trials_are_failed(tmp_path):
    storage = open_storage(str(tmp_path / "journal.log"), heartbeat_seconds=1)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    beats = []
    real = storage.record_heartbeat

    def record(identifier: int) -> None:
        beats.append((identifier, threading.current_thread() is not threading.main_thread()))
        real(identifier)

    storage.record_heartbeat = record
    with heartbeat_thread(study, trial):
        time.sleep(2.5)
    assert len(beats) >= 2 and set(beats) == {(trial_id(trial), True)}
    # Silent for longer than the grace period (6 heartbeats): Optuna's recovery, through
    # the storage's STALE_TRIAL_IDS, fails it and the retry callback queues it again.
    time.sleep(6.5)
    study_id = storage.get_study_id_from_name(study.study_name)
    assert getattr(storage, STALE_TRIAL_IDS)(study_id) == [trial_id(trial)]
    assert isinstance(storage.get_heartbeat_stale_trial_callback(), Retry)
    optuna.storages.fail_stale_trials(study)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states == ["FAIL", "WAITING"]


def test_a_trial_taken_from_the_queue_holds_its_params_where_fixed_params_reads_them():
    study = optuna.create_study()
    study.enqueue_trial({"x": 3})
    queued, sampled = study.ask(), study.ask()
    stored = storage_of(study)
    assert fixed_params(stored.get_trial(trial_id(queued))) == {"x": 3}
    assert fixed_params(stored.get_trial(trial_id(sampled))) is None
