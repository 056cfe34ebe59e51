"""Every bad input exits 2 with one line saying what is wrong, and leaves the study that is
already there exactly as it was. bench/bad_input_timing.py times the same cases."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bad_input_cases import BUDGETS, CASES, OUT, Case


def compsearch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compsearch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "250"},
    )


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its content, and every folder."""
    return {
        str(path.relative_to(folder)): (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
        )
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder holding a real study of two trained trials (small models, to be quick),
    beside which every case runs."""
    root = tmp_path_factory.mktemp("bad-input")
    (root / "small.toml").write_text('stages = 2\nwidth = [8, 16]\nprecisions = ["fp32"]\n')
    made = compsearch(
        "run", *BUDGETS, "--trials", "2", "--epochs", "2", "--space", "small.toml", cwd=root
    )
    assert made.returncode == 0, made.stderr
    for case in CASES:
        if case.arrange is not None:
            case.arrange(root)
    return root


def test_there_are_at_least_20_cases():
    assert len(CASES) >= 20
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_exits_2_with_one_line_and_leaves_the_study_as_it_was(root, case: Case):
    # The whole folder the case runs in, not only OUT: nothing is written anywhere.
    before = snapshot(root)
    result = compsearch(*case.args, cwd=root)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case.fragment in lines[0], lines[0]
    assert "Traceback" not in result.stdout
    assert snapshot(root) == before
    assert not (root / OUT / "elsewhere").exists()
