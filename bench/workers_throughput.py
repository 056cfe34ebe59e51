"""Trials per hour with K worker processes on one machine (`compsearch run --workers K`).

Each K gets a fresh study on the same storage kind and runs the same number of trained
trials; the figure is trained (or early-stopped) trials per hour of wall time, from the
process start to the end of the last trial (data loading and the final plots included).

    python bench/workers_throughput.py                      # digits, K = 1 2 4
    python bench/workers_throughput.py --workers 1 2 4 --trials 24 --epochs 12
    python bench/workers_throughput.py --storage postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna

from compsearch.search.study import open_storage


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--trials", type=int, default=24, help="trained trials per K")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--subset", help="training images per trial (default: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--storage", help="a shared storage URL; default: a SQLite file per K")
    args = parser.parse_args()
    print(
        f"{cpu_name()}, {os.cpu_count()} cores; dataset {args.dataset}, {args.trials} "
        f"trials of {args.epochs} epochs per K; storage {args.storage or 'SQLite'}"
    )
    print(f"{'workers':>7} {'seconds':>8} {'trials/hour':>12} {'speed-up':>9} {'trained':>8}")
    dataset = args.dataset
    if dataset.startswith("folder:"):
        dataset = "folder:" + str(Path(dataset.removeprefix("folder:")).resolve())
    base = None
    with tempfile.TemporaryDirectory() as folder:
        for workers in args.workers:
            study = f"bench_{workers}_{uuid.uuid4().hex[:6]}"
            out = Path(folder) / study
            command = [
                sys.executable, "-m", "compsearch", "run", "--budget-params", "2e6",
                "--budget-kb", "300", "--dataset", dataset, "--trials", str(args.trials),
                "--epochs", str(args.epochs), "--workers", str(workers), "--device",
                args.device, "--out", str(out), "--study", study,
            ]  # fmt: skip
            if args.storage:
                command += ["--storage", args.storage]
            if args.subset:
                command += ["--subset", args.subset]
            started = time.perf_counter()
            # Run from the scratch folder: in a source checkout, the current folder would
            # shadow the installed package.
            result = subprocess.run(command, capture_output=True, text=True, cwd=folder)
            seconds = time.perf_counter() - started
            if result.returncode != 0:
                raise SystemExit(f"K={workers} failed: {result.stderr[-2000:]}")
            url = args.storage or f"sqlite:///{out / study / 'study.db'}"
            trials = optuna.load_study(study_name=study, storage=open_storage(url)).trials
            finished = sum(
                t.state.name == "PRUNED"
                or (t.state.name == "COMPLETE" and t.user_attrs.get("trained"))
                for t in trials
            )
            rate = finished / seconds * 3600
            base = base or rate
            print(f"{workers:>7} {seconds:>8.1f} {rate:>12.0f} {rate / base:>8.2f}x {finished:>8}")
            if args.storage:
                optuna.delete_study(study_name=study, storage=open_storage(args.storage))


if __name__ == "__main__":
    main()
