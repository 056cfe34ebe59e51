"""How long each bad input in tests/bad_input_cases.py takes to be refused.

Each case runs `python -m compsearch ...` as a user would, beside a real study of two
trained digits trials, and the wall time from start to exit is printed (goal: every case
refused within 2 s, with exit code 2).

    python bench/bad_input_timing.py
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bad_input_cases import BUDGETS, CASES  # noqa: E402

GOAL_SECONDS = 2.0


def compsearch(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "compsearch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "250"},
    )
    return result, time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        made, _ = compsearch("run", *BUDGETS, "--trials", "2", "--epochs", "2", cwd=root)
        if made.returncode != 0:
            raise SystemExit(f"could not create the study: {made.stderr}")
        for case in CASES:
            if case.arrange is not None:
                case.arrange(root)
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}"
        )
        print(f"{'case':<42} {'exit':>4} {'seconds':>8}  error line")
        times = []
        for case in CASES:
            result, seconds = compsearch(*case.args, cwd=root)
            times.append(seconds)
            line = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
            print(f"{case.name:<42} {result.returncode:>4} {seconds:>8.2f}  {line[:90]}")
        slow = sum(t > GOAL_SECONDS for t in times)
        print(
            f"{len(CASES)} cases: median {sorted(times)[len(times) // 2]:.2f} s, "
            f"slowest {max(times):.2f} s; {slow} over the {GOAL_SECONDS:g} s goal"
        )


if __name__ == "__main__":
    main()
