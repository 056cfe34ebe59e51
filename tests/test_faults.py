"""Faults inside one worker: a diverging run, out of memory, Ctrl-C, a lost worker.

Each failed trial records its reason and the search goes on; an interrupted or lost trial
is queued to run again by Optuna's retry callback.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from conftest import SCHEDULE

from compsearch.objectives.data import load_dataset
from compsearch.objectives.train import TrainingDiverged
from compsearch.results.records import LOST
from compsearch.results.table import trials_frame
from compsearch.search import loop as run_module
from compsearch.search.loop import SearchSettings, fail_stale_trials, search
from compsearch.search.optuna_private import storage_of, trial_id
from compsearch.search.study import DIRECTIONS, open_storage
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.space import space_for

SPACE = space_for(1, 10, 8)
LOOSE = Budgets(params=1e6, size_kb=100.0)


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", seed=0, subset=200)


def new_study(folder, heartbeat: int = 10) -> optuna.Study:
    return optuna.create_study(
        storage=open_storage(f"sqlite:///{folder / 'study.db'}", heartbeat),
        directions=list(DIRECTIONS),
        sampler=optuna.samplers.RandomSampler(seed=1),
    )


def test_a_diverged_or_out_of_memory_trial_fails_with_its_reason_and_the_search_goes_on(
    data, tmp_path, monkeypatch
):
    real = run_module.run_trial
    faults = [
        TrainingDiverged("training loss became nan in epoch 1 at 8 px (learning rate 0.1)"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ]

    def faulty(*args, **kwargs):
        if faults:
            raise faults.pop(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "run_trial", faulty)
    study = new_study(tmp_path)
    settings = SearchSettings(LOOSE, 2, None, 0, "cpu", tmp_path, early_stopping=False)
    counts = search(study, SPACE, SCHEDULE, data, settings, console=None)
    assert counts.trained == 2 and counts.failed == 2
    frame = trials_frame(study, LOOSE)
    failed = frame[frame["state"] == "FAIL"]
    assert list(failed["reason"]) == [
        "TrainingDiverged: training loss became nan in epoch 1 at 8 px (learning rate 0.1)",
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
    ]
    assert int(frame["trained"].sum()) == 2
    assert (frame[frame["trained"]]["state"] == "COMPLETE").all()


def test_a_schedule_that_always_diverges_stops_the_search_with_the_reason(data, tmp_path):
    # A learning rate this large makes every trial's loss infinite or NaN.
    wild = dataclasses.replace(SCHEDULE, learning_rate=1e12)
    study = new_study(tmp_path)
    settings = SearchSettings(
        LOOSE, 2, None, 0, "cpu", tmp_path, early_stopping=False, max_failures_in_a_row=3
    )
    counts = search(study, SPACE, wild, data, settings, console=None)
    assert counts.trained == 0 and counts.failed == 3
    assert counts.stopped_reason.startswith("3 trials in a row failed, the last with Training")
    reasons = trials_frame(study, LOOSE)["reason"]
    assert reasons[reasons.str.startswith("TrainingDiverged: training loss became")].size == 3


@pytest.mark.parametrize("where", ["estimate", "write_result"])
def test_ctrl_c_outside_training_still_fails_the_trial_and_queues_it(
    data, tmp_path, monkeypatch, where
):
    """Ctrl-C while a config is estimated (before training) or while a trained trial's
    figures are written: the trial is failed with its reason, never left running."""
    real = getattr(run_module, where)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second trial
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, where, interrupted)
    study = new_study(tmp_path)
    settings = SearchSettings(LOOSE, 3, None, 0, "cpu", tmp_path, early_stopping=False)
    with pytest.raises(KeyboardInterrupt):
        search(study, SPACE, SCHEDULE, data, settings, console=None)
    states = [t.state.name for t in study.trials]
    assert "RUNNING" not in states
    (failed,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed.user_attrs["reason"] == run_module.INTERRUPTED
    (queued,) = [t for t in study.trials if t.state.name == "WAITING"]
    assert queued.params == failed.params and queued.user_attrs["retry_of"] == failed.number


def test_a_lost_workers_trial_is_failed_and_run_again(data, tmp_path):
    """A trial left RUNNING with no heartbeat (its worker was killed) is failed by the next
    worker once the grace period has passed, and its config runs again."""
    study = new_study(tmp_path, heartbeat=1)
    lost = study.ask({"stage1_width": optuna.distributions.IntDistribution(4, 64)})
    lost.set_user_attr("estimated_params", 1234)
    # The killed worker's last heartbeat, then silence for longer than the grace period.
    storage_of(study).record_heartbeat(trial_id(lost))
    time.sleep(1 * 6 + 1.5)
    fail_stale_trials(study)
    frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert frozen[lost.number].state.name == "FAIL"
    (retry,) = [t for t in frozen.values() if t.state.name == "WAITING"]
    assert retry.params == lost.params
    assert retry.user_attrs == {"estimated_params": 1234, "retry_of": lost.number}
    row = trials_frame(study, LOOSE).set_index("number").loc[lost.number]
    assert row["reason"] == f"{LOST}; run again as trial {retry.number}"


def test_ctrl_c_keeps_every_finished_trial_and_queues_the_interrupted_one(tmp_path):
    """SIGINT in the middle of a trial: exit 130, finished trials kept, the interrupted one
    failed with its reason and run again by the next `run`."""
    command = [
        sys.executable, "-m", "compsearch.search.cli", "run", "--budget-params", "2e6",
        "--budget-kb", "300", "--trials", "3", "--out", str(tmp_path), "--no-anchors",
    ]  # fmt: skip
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [*command, "--epochs", "400", "--time", "none"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell starts background jobs with SIGINT ignored, and Python then installs no
        # Ctrl-C handler: give the run the terminal's default whatever started pytest.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        storage = open_storage(f"sqlite:///{tmp_path / 'digits' / 'study.db'}")
        deadline = time.monotonic() + 120
        running = []
        while not running and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="digits", storage=storage)
            except KeyError:
                continue
            running = [
                t
                for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                if "worker" in t.user_attrs and "estimated_params" in t.user_attrs
            ]
        assert running, "no trial started within two minutes"
        # A config over budget is told at once; one trained is well inside 400 epochs.
        time.sleep(1.0)
        first.send_signal(signal.SIGINT)
        output, _ = first.communicate(timeout=60)
    finally:  # never leave a run behind, whatever failed
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 130, output
    assert "stopped by Ctrl-C" in output and "Traceback" not in output
    study = optuna.load_study(study_name="digits", storage=storage)
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    (interrupted,) = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert interrupted.number >= running[0].number
    assert interrupted.user_attrs["reason"] == run_module.INTERRUPTED
    (waiting,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert waiting.params == interrupted.params
    before = {t.number: (t.state, t.values) for t in study.trials}

    # One more trial: the queued rerun, which the study hands out before any new config.
    second = subprocess.run(
        [*command, "--epochs", "2", "--trials", "1", "--time", "none"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "1 interrupted or lost trial(s) queued to run again" in second.stdout
    study = optuna.load_study(study_name="digits", storage=storage)
    for number, (state, values) in before.items():
        if state.name != "WAITING":
            assert (study.trials[number].state, study.trials[number].values) == (state, values)
    rerun = study.trials[waiting.number]
    assert rerun.state.name in ("COMPLETE", "PRUNED")
    assert rerun.params == interrupted.params
    assert rerun.user_attrs["retry_of"] == interrupted.number
