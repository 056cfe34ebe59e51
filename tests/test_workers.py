"""Several workers on one storage, against the real servers of this machine.

PostgreSQL (127.0.0.1:5432), MariaDB (3306) and Redis (6379) must be running; a test whose
server cannot be reached skips and says which. Each test creates its own database (or an
empty Redis database index) and removes it afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest

from compsearch.results.records import LOST, SURPLUS, study_settings
from compsearch.results.table import trials_frame
from compsearch.search.common import GRACE_HEARTBEATS
from compsearch.search.study import open_storage

HOST = "127.0.0.1"
RUN = ("run", "--budget-params", "2e6", "--budget-kb", "300", "--space", "fast.toml")
HEARTBEAT = 1  # seconds, so a killed worker's trial goes stale in GRACE_HEARTBEATS seconds
# Small fp32 models: these tests are about workers and storages, not what trials find.
FAST_SPACE = """stages = 2
stem_width = [8, 16]
width = [8, 16]
depth = [1, 1]
precisions = ["fp32"]
prune_fraction = [0.0, 0.0]
"""


@pytest.fixture(autouse=True)
def fast_space(tmp_path):
    (tmp_path / "fast.toml").write_text(FAST_SPACE)


def compsearch(*args: str, cwd: Path, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "compsearch", *args]
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=env, text=True, **popen)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def unique_name() -> str:
    return f"compsearch_test_{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def postgres_database(user: str = "postgres", password: str = ""):
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(
            host=HOST, port=5432, user=user, dbname="postgres", connect_timeout=3, autocommit=True
        )
    except psycopg.OperationalError as error:
        pytest.skip(f"PostgreSQL is not reachable at {HOST}:5432: {error}")
    name = unique_name()
    admin.execute(f"CREATE DATABASE {name}")
    try:
        credentials = f"{user}:{password}" if password else user
        yield f"postgresql://{credentials}@{HOST}:5432/{name}"
    finally:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@contextlib.contextmanager
def mariadb_database():
    pymysql = pytest.importorskip("pymysql")
    try:
        admin = pymysql.connect(host=HOST, port=3306, user="root", password="", connect_timeout=3)
    except pymysql.err.OperationalError as error:
        pytest.skip(f"MariaDB is not reachable at {HOST}:3306: {error}")
    name = unique_name()
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield f"mysql://root@{HOST}:3306/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@contextlib.contextmanager
def redis_database():
    redis = pytest.importorskip("redis")
    try:
        servers = [redis.Redis(host=HOST, port=6379, db=index) for index in range(1, 16)]
        empty = next(server for server in servers if server.dbsize() == 0)
    except redis.exceptions.ConnectionError as error:
        pytest.skip(f"Redis is not reachable at {HOST}:6379: {error}")
    except StopIteration:
        pytest.skip("every Redis database index 1..15 is in use")
    index = empty.connection_pool.connection_kwargs["db"]
    try:
        yield f"redis://{HOST}:6379/{index}"
    finally:
        empty.flushdb()


@contextlib.contextmanager
def journal_file(folder: Path):
    yield str(folder / "journal.log")


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        trial
        for trial in study.trials
        if trial.state.name == "PRUNED"
        or (trial.state.name == "COMPLETE" and trial.user_attrs.get("trained"))
    ]


def test_three_workers_on_postgresql_finish_exactly_n_trials_with_no_duplicate(tmp_path):
    with postgres_database() as url:
        result = compsearch(
            *RUN, "--trials", "9", "--epochs", "2", "--workers", "3", "--storage", url,
            "--study", "shared", "--rungs", "1", cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        study = optuna.load_study(study_name="shared", storage=open_storage(url))
        trials = study.trials
        assert len(finished(study)) == 9
        # A worker that asked for a trial together with another when one was left gives
        # its trial back unsampled; nothing else fails.
        failed = [trial for trial in trials if trial.state.name == "FAIL"]
        assert all(t.user_attrs["reason"] == SURPLUS and t.params == {} for t in failed)
        trials = [trial for trial in trials if trial not in failed]
        assert {trial.state.name for trial in trials} <= {"COMPLETE", "PRUNED"}
        workers = {trial.user_attrs["worker"] for trial in trials}
        assert len(workers) == 3  # every worker asked for trials
        # One rung, so no promotion trains a config again (the trials stay long enough for
        # all three workers to get some). No config was run twice, as workers whose
        # samplers were seeded alike would
        # (every trial draws the float leaky_relu_slope, so two proposals never tie).
        numbers_by_config = collections.defaultdict(list)
        for trial in finished(study):
            numbers_by_config[tuple(sorted(trial.params.items()))].append(trial.number)
        assert [numbers for numbers in numbers_by_config.values() if len(numbers) > 1] == []
        trained = [t for t in trials if t.user_attrs.get("trained")]
        # Each trained trial wrote its own file, once.
        files = sorted((tmp_path / "runs" / "shared" / "trials").glob("*/model.onnx"))
        assert [int(path.parent.name) for path in files] == [t.number for t in trained]
        # Only worker 0 wrote the results, after all had finished.
        frame = pd.read_csv(tmp_path / "runs" / "shared" / "trials.csv")
        assert len(frame) == len(trials) + len(failed)


@pytest.mark.parametrize("storage", ["postgresql", "journal", "redis"])
def test_a_worker_killed_mid_trial_has_its_trial_run_again_and_nothing_else_lost(storage, tmp_path):
    make = {
        "postgresql": postgres_database,
        "journal": lambda: journal_file(tmp_path),
        "redis": redis_database,
    }[storage]
    with make() as url:
        where = ("--storage", url, "--study", "faults", "--heartbeat", str(HEARTBEAT))
        earlier = compsearch(*RUN, "--trials", "2", "--epochs", "2", *where, cwd=tmp_path)
        assert earlier.returncode == 0, earlier.stderr
        study = optuna.load_study(study_name="faults", storage=open_storage(url))
        kept = {t.number: (t.state, t.values, t.params) for t in study.trials}

        doomed = compsearch(
            *RUN, "--trials", "1", "--epochs", "5000", "--time", "none", *where, cwd=tmp_path,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        victim = wait_for_training(study, kept, deadline=time.monotonic() + 120)
        doomed.kill()  # SIGKILL: no handler runs, the trial stays RUNNING
        doomed.wait()
        assert study.trials[victim].state.name == "RUNNING"
        time.sleep(HEARTBEAT * GRACE_HEARTBEATS + 1.5)  # its heartbeat is now stale

        survivor = compsearch(*RUN, "--trials", "1", "--epochs", "2", *where, cwd=tmp_path)
        assert survivor.returncode == 0, survivor.stderr
        assert "1 interrupted or lost trial(s) queued to run again" in survivor.stdout
        study = optuna.load_study(study_name="faults", storage=open_storage(url))
        lost = study.trials[victim]
        assert lost.state.name == "FAIL"
        (rerun,) = [t for t in study.trials if t.user_attrs.get("retry_of") == victim]
        assert rerun.state.name in ("COMPLETE", "PRUNED") and rerun.params == lost.params
        for number, record in kept.items():  # nothing finished before was touched
            trial = study.trials[number]
            assert (trial.state, trial.values, trial.params) == record
        assert len(finished(study)) == 3
        reasons = trials_frame(study, study_settings(study).budgets).set_index("number")["reason"]
        assert reasons[victim] == f"{LOST}; run again as trial {rerun.number}"


def wait_for_training(study: optuna.Study, kept: dict, deadline: float) -> int:
    """The number of the new trial once it has been training for a second."""
    while time.monotonic() < deadline:
        running = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.number not in kept and t.state.name == "RUNNING" and "worker" in t.user_attrs
        ]
        if running and time.time() - running[0].datetime_start.timestamp() > 1.0:
            return running[0].number
        time.sleep(0.3)
    pytest.fail("no trial started training within two minutes")


def test_a_mysql_url_works_against_mariadb(tmp_path):
    with mariadb_database() as url:
        where = ("--storage", url, "--study", "maria")
        result = compsearch(*RUN, "--trials", "2", "--epochs", "2", *where, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        study = optuna.load_study(study_name="maria", storage=open_storage(url))
        assert len(finished(study)) == 2
        shown = compsearch("show", *where, cwd=tmp_path)
        assert shown.returncode == 0 and "Feasible Pareto front of maria" in shown.stdout


def test_a_password_in_the_storage_url_is_never_printed_or_written(tmp_path):
    secret = "S3cretPassw0rd"
    # The server trusts local connections, so any password is accepted; it must still
    # appear nowhere.
    with postgres_database(password=secret) as url:
        where = ("--storage", url, "--study", "private")
        outputs = [
            compsearch(*RUN, "--trials", "2", "--epochs", "2", *where, cwd=tmp_path),
            compsearch("show", "--all", *where, cwd=tmp_path),
            compsearch("plot", *where, cwd=tmp_path),
            compsearch("export", "--epochs", "2", *where, cwd=tmp_path),
        ]
        for result in outputs:
            assert result.returncode == 0, result.stderr
            assert secret not in result.stdout + result.stderr
        assert "postgres:***@" in outputs[0].stdout
        written = [path for path in (tmp_path / "runs").rglob("*") if path.is_file()]
        assert {"trials.csv", "report.html", "model.json"} <= {path.name for path in written}
        for path in written:
            assert secret.encode() not in path.read_bytes(), path
    unreachable = url.replace(":5432/", ":5999/")
    refused = compsearch(*RUN, "--storage", unreachable, cwd=tmp_path)
    assert refused.returncode == 2
    assert secret not in refused.stdout + refused.stderr
    assert refused.stderr.startswith("error: cannot open storage postgresql://postgres:***@")
