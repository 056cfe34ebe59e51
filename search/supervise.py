"""`run` and `export` in a child process, so a native crash costs one trial, not the search.

A fault inside a native kernel (a segmentation fault in oneDNN, glibc aborting on a
corrupted heap) kills the process that hit it, and no Python handler runs. So the
command a user types only supervises: it starts the real job as a child process, which
tells it through a pipe which study it works on and which trial and step it is in. When
the child dies of a signal, the supervisor fails that trial with the signal and the step
as its reason and starts a new child that goes on with the search; an export says what
happened instead. Exit codes of a child that ends normally (0, 1, 2, 130) pass through.

This module imports neither torch nor optuna until a crash needs the storage.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REPORT_FD_FLAG = "--report-fd"  # the child's end of the pipe; its presence marks a child
# Crashes in a row, with no trial finished between them, after which a run gives up: the
# fault is then not one trial's.
MAX_CRASHES_IN_A_ROW = 10
SIGNAL_MEANINGS = {
    signal.SIGSEGV: "a segmentation fault",
    signal.SIGABRT: "an abort, as glibc does on a corrupted heap",
    signal.SIGBUS: "a bus error",
    signal.SIGFPE: "a floating-point exception",
    signal.SIGILL: "an illegal instruction",
    signal.SIGKILL: "killed, as the kernel's out-of-memory killer does",
}
PR_SET_PDEATHSIG = 1  # linux/prctl.h


# Set in the child when Ctrl-C or SIGTERM came. The KeyboardInterrupt the handler raises
# is lost when it lands in a callback Python runs for the garbage collector (a
# SQLAlchemy weakref did so); the search then stops at its next trial.
STOP_REQUESTED = threading.Event()


def request_stop(number: int, _frame: object) -> None:
    STOP_REQUESTED.set()
    raise KeyboardInterrupt


class Reporter:
    """The child's side: one JSON line per message on the pipe; nothing without one."""

    def __init__(self, fd: int | None) -> None:
        self.stream = os.fdopen(fd, "w", buffering=1) if fd is not None else None

    def send(self, **message: Any) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(json.dumps(message) + "\n")
        except OSError:  # the supervisor is gone; the job goes on without it
            self.stream = None

    def step(self, trial: int, step: str) -> None:
        self.send(trial=trial, step=step)

    def done(self, trial: int, outcome: str) -> None:
        self.send(trial=trial, outcome=outcome)


@dataclass
class ChildState:
    """What the child last said."""

    study: str | None = None
    storage: str | None = None
    finish_at: int | None = None
    trial: int | None = None  # the trial in progress, None between trials
    step: str = "starting"
    finished_trials: int = 0  # trials it finished, by any outcome

    def read(self, fd: int) -> None:
        with os.fdopen(fd) as stream:
            for line in stream:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.update(message)

    def update(self, message: dict[str, Any]) -> None:
        for key in ("study", "storage", "finish_at"):
            if key in message:
                setattr(self, key, message[key])
        if "outcome" in message:
            self.trial, self.step = None, "between trials"
            self.finished_trials += 1
        elif "step" in message:
            self.trial = message.get("trial")
            self.step = message["step"]


def describe_signal(number: int) -> str:
    """'SIGSEGV (a segmentation fault)'."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
    meaning = SIGNAL_MEANINGS.get(signal.Signals(number))
    return f"{name} ({meaning})" if meaning else name


def prepare_child() -> None:
    """In the child, before it runs: a process group of its own (Ctrl-C in a terminal
    then reaches the supervisor alone, which passes it on once: a child that got it
    twice would not finish its cleanup), and death when the supervisor dies, as a
    killed worker's (its trial then goes stale and runs again), rather than a life
    unseen."""
    os.setpgid(0, 0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the child outlives a killed supervisor
        pass


def start_child(command: list[str]) -> tuple[subprocess.Popen, ChildState, threading.Thread]:
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        [*command, REPORT_FD_FLAG, str(write_end)], pass_fds=(write_end,), preexec_fn=prepare_child
    )
    os.close(write_end)
    state = ChildState()
    reader = threading.Thread(target=state.read, args=(read_end,), daemon=True)
    reader.start()
    return child, state, reader


class Stopped(Exception):
    """The supervisor was asked to stop (Ctrl-C, SIGTERM) and passed it on to its child,
    which then ended with `code`."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def wait_forwarding_signals(child: subprocess.Popen) -> int:
    """The child's exit code (negative: the signal that killed it); Ctrl-C and SIGTERM
    sent to the supervisor go on to the child, and its end then raises Stopped: a child
    that a stop killed has not crashed."""
    stopped = []

    def forward(number: int, _frame: object) -> None:
        stopped.append(number)
        if child.poll() is None:
            child.send_signal(number)

    previous = {
        number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        code = child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if stopped:
        raise Stopped(code if code >= 0 else 128 - code)
    return code


def fail_crashed_trial(state: ChildState, reason: str) -> bool:
    """Fail the child's trial in its storage with `reason`; False when it was no longer
    running (another worker failed it, or the crash came after its outcome was told)."""
    from optuna.trial import TrialState

    from compsearch.results.records import write_failed_in_storage
    from compsearch.search.study import open_storage

    storage = open_storage(state.storage)
    study_id = storage.get_study_id_from_name(state.study)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, state.trial)
    if storage.get_trial(trial_id).state != TrialState.RUNNING:
        return False
    write_failed_in_storage(storage, trial_id, reason)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)
    return True


def run_child(command: list[str]) -> tuple[int, ChildState]:
    """Run `command` as a child to its end: its exit code (negative: the signal that
    killed it) and the last it said. Raises Stopped when the supervisor was stopped."""
    child, state, reader = start_child(command)
    code = wait_forwarding_signals(child)
    reader.join(timeout=5)  # the rest of what it said, up to its end
    return code, state


def supervise_run(command: list[str], say: Callable[[str], None]) -> int:
    """Run `command` (a `compsearch run`) as a child, again after each crash, until it
    ends by itself; its exit code."""
    crashes_in_a_row = 0
    crashed: list[str] = []  # "trial N" of each trial a crash failed
    restart: list[str] = []
    while True:
        try:
            code, state = run_child([*command, *restart])
        except Stopped as stop:
            return stop.code
        if code >= 0:
            if crashed:  # the last child's summary counts only its own trials
                say(
                    f"{len(crashed)} trial(s) failed when their process died ("
                    + ", ".join(crashed)
                    + "); `compsearch show --all` gives each one's reason"
                )
            return code
        what = describe_signal(-code)
        if state.trial is None or state.storage is None:
            say(
                f"error: the run's process died of {what} while {state.step}, outside any "
                "trial; the study keeps every finished trial"
            )
            return 1
        reason = f"its process died of {what} while {state.step}"
        failed = fail_crashed_trial(state, reason)
        crashed.append(f"trial {state.trial}")
        crashes_in_a_row = 1 if state.finished_trials else crashes_in_a_row + 1
        if crashes_in_a_row >= MAX_CRASHES_IN_A_ROW:
            say(
                f"error: {crashes_in_a_row} trials in a row crashed their process, the last "
                f"(trial {state.trial}) with {what} while {state.step}; the study keeps every "
                "finished trial, and `compsearch show --all` gives each one's reason"
            )
            return 1
        say(
            f"trial {state.trial} failed: {reason}"
            + ("" if failed else " (it was no longer running)")
            + "; the search goes on in a new process"
        )
        # The same search: the same target of finished trials, and no second set of
        # worker processes (those of `--workers` go on by themselves).
        restart = ["--finish-at", str(state.finish_at), "--workers", "1"]


def supervise_export(command: list[str], say: Callable[[str], None]) -> int:
    """Run `command` (a `compsearch export`) as a child; say what happened if it crashes."""
    try:
        code, state = run_child(command)
    except Stopped as stop:
        return stop.code
    if code >= 0:
        return code
    trial = f" of trial {state.trial}" if state.trial is not None else ""
    say(
        f"error: the export{trial} stopped: its process died of {describe_signal(-code)} "
        f"while {state.step}; no model was written. Such faults can be intermittent: run "
        "the export again, or export another trial with --trial N"
    )
    return 1


def launcher() -> list[str]:
    """The interpreter and script or module this process was started with, without its
    arguments: how to start another process like it."""
    original = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return [sys.executable, *original[1 : len(original) - len(sys.argv) + 1]]
