"""Workers started by hand at the same moment on a database no one has used yet: each
must join the one study (Optuna's tables are created by whichever comes first)."""

from __future__ import annotations

import multiprocessing
import subprocess

import optuna
import pytest
from test_workers import (
    FAST_SPACE,
    RUN,
    compsearch,
    finished,
    mariadb_database,
    postgres_database,
)

from compsearch.search import study as study_module
from compsearch.search.common import UsageError
from compsearch.search.study import open_storage

DATABASES = {"postgresql": postgres_database, "mysql": mariadb_database}
PROCESSES = 4


def open_together(url: str, barrier, results) -> None:
    barrier.wait()  # all at once, as workers on several machines started by one script
    try:
        open_storage(url)
        results.put("opened")
    except UsageError as error:
        results.put(str(error))


@pytest.mark.parametrize("database", DATABASES)
def test_storages_opened_at_the_same_moment_on_a_new_database_all_open(database):
    context = multiprocessing.get_context("fork")
    with DATABASES[database]() as url:
        barrier = context.Barrier(PROCESSES)
        results = context.Queue()
        processes = [
            context.Process(target=open_together, args=(url, barrier, results))
            for _ in range(PROCESSES)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        outcomes = [results.get(timeout=5) for _ in processes]
    assert outcomes == ["opened"] * PROCESSES


@pytest.mark.parametrize("database", DATABASES)
def test_workers_started_by_hand_at_once_on_a_new_database_all_join(database, tmp_path):
    (tmp_path / "fast.toml").write_text(FAST_SPACE)
    with DATABASES[database]() as url:
        args = (*RUN, "--trials", "3", "--epochs", "2", "--subset", "200")
        args += ("--storage", url, "--study", "together")
        workers = [
            compsearch(*args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for _ in range(3)
        ]
        outputs = [worker.communicate(timeout=600)[0] for worker in workers]
        for worker, output in zip(workers, outputs, strict=True):
            assert worker.returncode == 0, output
        study = optuna.load_study(study_name="together", storage=open_storage(url))
        # Each asked the one study for trials; together they finished the 3 asked for.
        joined = {trial.user_attrs["worker"] for trial in study.trials}
        assert len(joined) == 3 and len(finished(study)) == 3


def test_a_storage_that_fails_for_another_reason_is_not_tried_again(monkeypatch):
    tries = []
    real = optuna.storages.RDBStorage

    def counted(*args, **kwargs):
        tries.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", counted)
    with pytest.raises(UsageError, match="cannot open storage"):
        open_storage("postgresql://postgres@127.0.0.1:5999/nothing")
    assert len(tries) == 1
    assert study_module.SCHEMA_TRIES > 1
