"""Storage, samplers and the study's own record of how it was created."""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback

# Optuna's own heartbeat interface, which its RDB storage implements; it is the hook that
# its stale-trial recovery (fail_stale_trials) works through.
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import FrozenTrial, TrialState

from compsearch.spaces.budgets import Budgets

SAMPLERS = ("tpe", "nsga2", "gp", "random")
DIRECTIONS = ("maximize", "minimize")  # accuracy, size_kb
OBJECTIVE_NAMES = ("accuracy", "size_kb")
SETTINGS_KEY = "compsearch"  # study user attribute holding what the study was created with
HEARTBEAT_SECONDS = 10  # how often a worker tells the storage that its trial is alive
GRACE_HEARTBEATS = 6  # a running trial silent for this many heartbeats lost its worker
MAX_RETRIES = 2  # times a config whose worker was lost or interrupted is run again


class UsageError(ValueError):
    """The user's input cannot work; the message says what is wrong and what to do."""


def storage_url(storage: str | None, folder: Path) -> str:
    return storage if storage else f"sqlite:///{folder / 'study.db'}"


def open_storage(
    url: str, heartbeat_seconds: int = HEARTBEAT_SECONDS
) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL, or from a plain path meaning a journal file.

    Every storage keeps heartbeats: a trial whose worker stops answering (kill -9, out of
    memory, a lost machine) is failed by the next worker that looks, and Optuna's
    RetryHeartbeatStaleTrialCallback queues its config to run again.
    """
    grace = heartbeat_seconds * GRACE_HEARTBEATS
    retry = Retry()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if url.startswith("redis://"):
                from optuna.storages.journal import JournalRedisBackend

                return HeartbeatJournalStorage(
                    JournalRedisBackend(url), heartbeat_seconds, grace, retry
                )
            if "://" not in url:
                from optuna.storages.journal import JournalFileBackend

                Path(url).parent.mkdir(parents=True, exist_ok=True)
                return HeartbeatJournalStorage(
                    JournalFileBackend(url), heartbeat_seconds, grace, retry
                )
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(
                sqlalchemy_url(url),
                heartbeat_interval=heartbeat_seconds,
                grace_period=grace,
                heartbeat_stale_trial_callback=retry,
            )
    except ModuleNotFoundError as error:
        raise UsageError(
            f"cannot open storage {redact(url)}: its driver {error.name} is not installed; "
            "pip install 'compsearch[servers]'"
        ) from None
    except Exception as error:  # every backend raises its own types
        raise UsageError(
            f"cannot open storage {redact(url)}: {first_line(error)}; check the URL and that "
            "the server is reachable"
        ) from None


def sqlalchemy_url(url: str) -> str:
    """mysql:// means SQLAlchemy's default driver (mysqlclient); without it, PyMySQL
    (installed by compsearch[servers]) serves the same URL."""
    if url.startswith("mysql://"):
        try:
            import MySQLdb  # noqa: F401
        except ImportError:
            return "mysql+pymysql://" + url.removeprefix("mysql://")
    return url


HEARTBEAT_ATTR = "compsearch:heartbeat"  # system attribute: time.time() of the last beat


class HeartbeatJournalStorage(optuna.storages.JournalStorage, BaseHeartbeat):
    """Optuna's journal storage (file or Redis) with the heartbeat its RDB storage has.

    Optuna gives journal storages no heartbeat, so lost workers' trials would stay
    RUNNING forever. Here a beat is a system attribute holding the wall-clock time; the
    rest (the beating thread, failing stale trials, retrying them) is Optuna's own, as for
    RDBStorage. Workers on several machines need clocks within the grace period.
    """

    def __init__(
        self,
        backend: BaseJournalBackend,
        heartbeat_interval: int,
        grace_period: int,
        stale_trial_callback: Retry,
    ) -> None:
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [
            trial._trial_id
            for trial in running
            if now - trial.system_attrs.get(HEARTBEAT_ATTR, now) > self._grace_period
        ]

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_trial_callback


class Retry(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a failed trial (its config queued to run again, at most
    MAX_RETRIES times), where the copy says which trial it retries and starts with none
    of the failed trial's outcome."""

    KEPT = ("estimated_params", "estimated_size_kb", "estimated_macs", "fitted_from")

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=MAX_RETRIES)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        kept = {key: trial.user_attrs[key] for key in self.KEPT if key in trial.user_attrs}
        trial.user_attrs = kept | {"retry_of": trial.number}
        super().__call__(study, trial)


def redact(url: str) -> str:
    """The URL with any password replaced, fit to print or store."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    if ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return f"{scheme}://{credentials}@{host}"


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # One density per parameter: on bench/search_efficiency.py it reached a better front
        # than multivariate TPE, whose joint density needs far more trials in a space of
        # some 35 parameters. constant_liar keeps parallel workers from proposing the same
        # config.
        return optuna.samplers.TPESampler(constant_liar=True, seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UsageError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def existing_trials(storage: optuna.storages.BaseStorage, name: str) -> int:
    """Trials already in study `name`, 0 when there is no such study."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def stored_settings(url: str, name: str) -> dict[str, Any] | None:
    """What study `name` was created with, or None when it does not exist yet.

    A local SQLite or journal file that does not exist is not created here: a run that
    stops at a usage error leaves no empty study behind.
    """
    local = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    if ("://" not in url or url.startswith("sqlite:///")) and not Path(local).exists():
        return None
    storage = open_storage(url)
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(study_id).get(SETTINGS_KEY)


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    settings: dict[str, Any],
    sampler: optuna.samplers.BaseSampler,
) -> optuna.Study:
    """Create the study, or load it after checking it was created with the same settings.

    `settings` holds what must not change within a study (dataset, budgets); a conflict
    is an error that names both values rather than a silent change.
    """
    existing = {summary.study_name for summary in optuna.get_all_study_summaries(storage)}
    if name in existing:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        stored = study.user_attrs.get(SETTINGS_KEY)
        if stored is None:
            raise UsageError(
                f"study {name!r} exists but was not created by compsearch; choose another --study"
            )
        for key in ("dataset", "budgets"):
            if stored[key] != settings[key]:
                raise UsageError(
                    f"study {name!r} was created with {key} {json.dumps(stored[key])}, not "
                    f"{json.dumps(settings[key])}; use the original {key} or a new --study"
                )
        return study
    study = optuna.create_study(
        storage=storage, study_name=name, directions=list(DIRECTIONS), sampler=sampler
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(OBJECTIVE_NAMES))
    study.set_user_attr(SETTINGS_KEY, settings)
    return study


def load_existing_study(storage: optuna.storages.BaseStorage, name: str | None) -> optuna.Study:
    names = [summary.study_name for summary in optuna.get_all_study_summaries(storage)]
    if name is None:
        if len(names) != 1:
            listed = ", ".join(names) if names else "none"
            raise UsageError(
                f"the storage holds {len(names)} studies ({listed}); name one with --study"
            )
        name = names[0]
    if name not in names:
        raise UsageError(
            f"no study {name!r} in the storage; studies there: {', '.join(names) or 'none'}"
        )
    return optuna.load_study(study_name=name, storage=storage)


def study_budgets(study: optuna.Study) -> Budgets:
    return Budgets(**study.user_attrs[SETTINGS_KEY]["budgets"])
