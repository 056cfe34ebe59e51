"""Storage, samplers and the study's own record of how it was created."""

from __future__ import annotations

import copy
import json
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import FrozenTrial, TrialState

from compsearch.results.records import (
    DEFAULT_OBJECTIVES,
    OBJECTIVES,
    NotCompsearchStudy,
    StudySettings,
    read_settings,
    retry_attrs,
    write_settings,
)
from compsearch.search.common import (
    GRACE_HEARTBEATS,
    HEARTBEAT_SECONDS,
    SAMPLERS,
    UsageError,
    first_line,
    redact,
    storage_url,
)
from compsearch.search.options import Location, check_study_name
from compsearch.search.optuna_private import BaseHeartbeat, trial_id
from compsearch.spaces.budgets import Budgets

# Optuna's directions of the default objectives (accuracy, size_kb).
DIRECTIONS = tuple(OBJECTIVES[name][1] for name in DEFAULT_OBJECTIVES)
MAX_RETRIES = 2  # times a config whose worker was lost or interrupted is run again


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
            return rdb_storage(sqlalchemy_url(url), heartbeat_seconds, grace, retry)
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


# Workers started together on a new database all create Optuna's tables; all but one
# then find them half made. Each tries again after a random pause, this many times.
SCHEMA_TRIES = 20
SCHEMA_PAUSE_SECONDS = (0.05, 0.5)
SETTINGS_WAIT_SECONDS = 10.0  # for the worker that created a study to record its settings


def rdb_storage(
    url: str, heartbeat_seconds: int, grace: int, retry: Retry
) -> optuna.storages.RDBStorage:
    """Optuna's RDBStorage, made when other processes are making it on the same new
    database at the same moment."""
    import sqlalchemy.exc

    for attempt in range(1, SCHEMA_TRIES + 1):
        try:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_seconds,
                grace_period=grace,
                heartbeat_stale_trial_callback=retry,
            )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.DatabaseError) as error:
            if attempt == SCHEMA_TRIES or not created_concurrently(error):
                raise
            time.sleep(random.uniform(*SCHEMA_PAUSE_SECONDS))


def created_concurrently(error: Exception) -> bool:
    """Whether `error` is what PostgreSQL or MySQL say when another connection created the
    same table, type, index or row a moment before (not a wrong URL or a lost server)."""
    import sqlalchemy.exc

    text = str(getattr(error, "orig", error)).lower()
    return isinstance(error, sqlalchemy.exc.IntegrityError) or any(
        phrase in text for phrase in ("already exists", "duplicate", "deadlock")
    )


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

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:  # BaseHeartbeat's STALE_TRIAL_IDS
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [
            trial_id(trial)
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

    def __init__(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            super().__init__(max_retry=MAX_RETRIES)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.deepcopy(trial)
        trial.user_attrs = retry_attrs(trial)
        super().__call__(study, trial)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](optuna.samplers, seed)


def existing_trials(storage: optuna.storages.BaseStorage, name: str) -> int:
    """Trials already in study `name`, 0 when there is no such study."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return 0
    return len(storage.get_all_trials(study_id, deepcopy=False))


def stored_settings(url: str, name: str) -> StudySettings | None:
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
    return read_settings(storage.get_study_user_attrs(study_id))


def open_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    settings: StudySettings,
    sampler: optuna.samplers.BaseSampler,
) -> optuna.Study:
    """Create the study, or load it after checking it was created with the same settings.

    `settings` holds what must not change within a study (dataset, budgets); a conflict
    is an error that names both values rather than a silent change.
    """
    existing = {summary.study_name for summary in optuna.get_all_study_summaries(storage)}
    if name not in existing:
        try:
            return create_study(storage, name, settings, sampler)
        except optuna.exceptions.DuplicatedStudyError:
            pass  # another worker started at the same moment created it
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    stored = read_settings(study.user_attrs)
    study_id = storage.get_study_id_from_name(name)
    # A worker that has just created the study records its settings a moment later.
    deadline = time.monotonic() + SETTINGS_WAIT_SECONDS
    while stored is None and not study.trials and time.monotonic() < deadline:
        time.sleep(0.2)
        stored = read_settings(storage.get_study_user_attrs(study_id))
    if stored is None:
        raise UsageError(
            f"study {name!r} exists but was not created by compsearch; choose another --study"
        )
    check_same_settings(name, stored, settings)
    return study


def check_same_settings(name: str, stored: StudySettings, settings: StudySettings) -> None:
    """What must not change within a study: its dataset, budgets, objectives and format."""
    if stored.dataset != settings.dataset:
        raise UsageError(
            f"study {name!r} was created with dataset {json.dumps(stored.dataset)}, not "
            f"{json.dumps(settings.dataset)}; use the original dataset or a new --study"
        )
    check_same_budgets(name, stored, settings.budgets)
    check_same_objectives(name, stored, settings.objectives)
    check_same_format(name, stored, settings.file_format)


def check_same_format(name: str, stored: StudySettings, file_format: str) -> None:
    if stored.file_format != file_format:
        raise UsageError(
            f"study {name!r} was created with --format {stored.file_format}, not {file_format}: "
            "its trials' sizes and accuracies are those files'; use the original --format or "
            "a new --study"
        )


def check_same_objectives(name: str, stored: StudySettings, objectives: tuple[str, ...]) -> None:
    if stored.objectives != objectives:
        raise UsageError(
            f"study {name!r} was created with --objectives {','.join(stored.objectives)}, not "
            f"{','.join(objectives)}; use the original objectives or a new --study"
        )


def check_same_budgets(name: str, stored: StudySettings, budgets: Budgets) -> None:
    if stored.budgets != budgets:
        raise UsageError(
            f"study {name!r} was created with budgets {json.dumps(stored.budgets.to_dict())}, "
            f"not {json.dumps(budgets.to_dict())}; use the original budgets or a new --study"
        )


def create_study(
    storage: optuna.storages.BaseStorage,
    name: str,
    settings: StudySettings,
    sampler: optuna.samplers.BaseSampler,
) -> optuna.Study:
    columns, directions = zip(*(OBJECTIVES[name] for name in settings.objectives), strict=True)
    study = optuna.create_study(
        storage=storage, study_name=name, directions=list(directions), sampler=sampler
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(columns))
    write_settings(study, settings)
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


def locate_study(location: Location, say: Callable[[str], None]) -> tuple[optuna.Study, Path]:
    """The study `location` means and its folder: --study, else the only or newest one
    under --out (`say` tells which when there are several)."""
    if location.storage:
        study = load_existing_study(open_storage(location.storage), location.study)
        check_study_name(study.study_name, where="the storage's study")
        folder = location.out / study.study_name
    elif location.study:
        folder = location.out / location.study
        if not (folder / "study.db").exists():
            raise UsageError(
                f"no study {location.study!r} under {location.out}; check --out and --study"
            )
    else:
        found = sorted(location.out.glob("*/study.db"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UsageError(
                f"no study under {location.out}; run 'compsearch run' first or set --out"
            )
        folder = found[-1].parent
        if len(found) > 1:
            say(f"{len(found)} studies under {location.out}; using the newest, {folder.name}")
    if not location.storage:
        study = load_existing_study(open_storage(storage_url(None, folder)), folder.name)
    if read_settings(study.user_attrs) is None:
        raise NotCompsearchStudy(f"study {study.study_name!r} was not created by compsearch")
    return study, folder
