"""A trial whose process dies (a native crash) costs that trial, never the search."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from compsearch.search.study import open_storage

SCRIPT = Path(__file__).with_name("crashing_compsearch.py")
FAST_SPACE = """stages = 2
stem_width = [8, 16]
width = [8, 16]
depth = [1, 1]
precisions = ["fp32"]
"""
RUN = (
    "run", "--budget-params", "2e6", "--budget-kb", "300", "--space", "fast.toml",
    "--subset", "200", "--epochs", "2",
)  # fmt: skip
CRASHED = "its process died of SIGSEGV (a segmentation fault) while pruning"


def crashing(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    (cwd / "fast.toml").write_text(FAST_SPACE)
    env = {**os.environ, "CRASH_MARKER": str(cwd / "crashed"), "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def trials(folder: Path) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(f"sqlite:///{folder / 'study.db'}")
    return optuna.load_study(study_name=folder.name, storage=storage).trials


def wait_for_a_trial_in_training(folder: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = []
        if (folder / "study.db").exists():  # never made here: the run makes it
            try:
                running = [t for t in trials(folder) if t.state.name == "RUNNING"]
            except KeyError:  # the study is not in it yet
                pass
        if any("estimated_params" in t.user_attrs for t in running):
            return
        time.sleep(0.5)
    pytest.fail("no trial started training within two minutes")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_trial_that_kills_its_process_fails_with_its_reason_and_the_search_goes_on(
    tmp_path, workers
):
    result = crashing(*RUN, "--trials", "3", "--workers", workers, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "crashed").exists()  # the crash did happen
    (crashed,) = [t for t in trials(tmp_path / "runs" / "digits") if t.state.name == "FAIL"]
    assert crashed.user_attrs["reason"] == CRASHED
    assert f"trial {crashed.number} failed: {CRASHED}; the search goes on" in result.stdout
    study = trials(tmp_path / "runs" / "digits")
    finished = [
        t
        for t in study
        if t.state.name == "PRUNED" or (t.state.name == "COMPLETE" and t.user_attrs["trained"])
    ]
    assert len(finished) == 3
    assert not [t for t in study if t.state.name == "RUNNING"]
    assert (tmp_path / "runs" / "digits" / "trials.csv").exists()
    assert "Traceback" not in result.stdout + result.stderr


def test_an_export_whose_process_dies_says_so_and_writes_nothing(tmp_path):
    (tmp_path / "crashed").write_text("not yet")  # the search itself must not crash
    searched = crashing(*RUN, "--trials", "1", cwd=tmp_path)
    assert searched.returncode == 0, searched.stdout + searched.stderr
    (tmp_path / "crashed").unlink()
    result = crashing("export", "--epochs", "2", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the export of trial ")
    assert "stopped: its process died of SIGSEGV (a segmentation fault) while pruning" in line
    assert not (tmp_path / "runs" / "digits" / "export").exists()


def test_sigterm_stops_a_run_as_ctrl_c_does_and_is_no_crash(tmp_path):
    """`kill PID` on the command: passed on to its child, which fails its trial as
    interrupted and queues it; the supervisor starts no new child."""
    (tmp_path / "crashed").write_text("never")  # no crash in this test
    (tmp_path / "fast.toml").write_text(FAST_SPACE)
    env = {**os.environ, "CRASH_MARKER": str(tmp_path / "crashed"), "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen(
        [sys.executable, str(SCRIPT), *RUN, "--epochs", "400", "--time", "none", "--trials", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for_a_trial_in_training(tmp_path / "runs" / "digits")
        time.sleep(1.0)
        run.send_signal(signal.SIGTERM)
        output, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 130, output
    assert "the search goes on in a new process" not in output
    states = [t.state.name for t in trials(tmp_path / "runs" / "digits")]
    assert "RUNNING" not in states
    failed = [t for t in trials(tmp_path / "runs" / "digits") if t.state.name == "FAIL"]
    if failed:  # the interrupt reached the trial: failed as interrupted, queued again
        (interrupted,) = failed
        assert interrupted.user_attrs["reason"] == "interrupted before it finished (Ctrl-C)"
        assert states.count("WAITING") == 1
    else:  # it landed in a garbage-collector callback: the run stopped after that trial
        assert "stopped by Ctrl-C" in output and "WAITING" not in states
