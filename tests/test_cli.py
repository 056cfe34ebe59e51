"""The command line as a user meets it: bad input, the end-to-end run, show and plot."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import sampled_configs

from compsearch.objectives.modelfile import load_model, save_model
from compsearch.objectives.teacher import teacher_arch
from compsearch.results.records import SETTINGS_KEY
from compsearch.search.cli import parse_amount, parse_duration
from compsearch.search.common import UsageError
from compsearch.spaces.budgets import amount
from compsearch.spaces.builder import build
from compsearch.spaces.estimate import estimate
from compsearch.spaces.space import load_space, space_for


def compsearch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "compsearch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        # Wide enough that rich does not wrap table cells the test looks for.
        env={**os.environ, "COLUMNS": "250"},
    )


@pytest.mark.parametrize(
    ("text", "value"), [("2e6", 2e6), ("2000000", 2e6), ("2M", 2e6), ("300k", 3e5), ("1.5", 1.5)]
)
def test_amounts_people_write_are_understood(text, value):
    assert parse_amount(text, "--budget-params") == value


@pytest.mark.parametrize("text", ["0", "-5", "abc", "nan", "inf", "", "1e400", "2MB", "0x10"])
def test_bad_amounts_are_usage_errors(text):
    with pytest.raises(UsageError, match="must be a number > 0"):
        parse_amount(text, "--budget-params")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("20m", 1200), ("1h30m", 5400), ("1.5h", 5400), ("45", 45), ("4m", 240),
     ("2h5s", 7205), (" 3 m ", 180), ("0.5m", 30)],
)  # fmt: skip
def test_durations_take_units_and_a_bare_number_is_seconds(text, seconds):
    assert parse_duration(text, "--time") == seconds


@pytest.mark.parametrize("text", ["0", "0m", "-5m", "4x", "", "m", "1h-30m", "1d", "nan", "5 min"])
def test_bad_durations_are_usage_errors(text):
    with pytest.raises(UsageError, match="must be a duration > 0 such as 90s, 20m or 1h30m"):
        parse_duration(text, "--time")


@pytest.mark.parametrize("text", ["2M", "4M", "1.5M", "3K"])
def test_a_capital_suffix_is_refused_as_ambiguous(text):
    with pytest.raises(UsageError, match="ambiguous: write minutes as"):
        parse_duration(text, "--time")


def test_timeout_is_an_alias_of_time_and_abbreviations_are_refused(capsys):
    from compsearch.search.cli import build_parser, run_options

    budgets = ["run", "--budget-params", "2e6", "--budget-kb", "300"]
    parser = build_parser()
    assert run_options(parser.parse_args([*budgets, "--timeout", "4m"])).time == 240
    assert run_options(parser.parse_args([*budgets, "--time", "1h30m"])).time == 5400
    with pytest.raises(SystemExit) as stopped:
        parser.parse_args([*budgets, "--tim", "4m"])
    assert stopped.value.code == 2 and "unrecognized arguments: --tim" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        # tests/test_bad_input.py holds the whole list; these are refused where a study
        # might otherwise have been created first.
        ["--budget-params", "2e6", "--budget-kb", "300", "--dataset", "mnist", "--data-dir", "x"],
        ["--budget-params", "2e6", "--budget-kb", "300", "--teacher", "missing.pt"],
        ["--budget-params", "2e6", "--budget-kb", "300", "--dataset", "folder:nowhere"],
    ],
)
def test_bad_input_leaves_no_empty_study_behind(tmp_path, args):
    result = compsearch("run", *args, "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not (tmp_path / "runs").exists()


def test_run_show_plot_and_resume(tmp_path):
    out = tmp_path / "runs"
    budget_params, budget_kb = 60_000, 60.0
    budget_args = ["--budget-params", "60k", "--budget-kb", str(budget_kb), "--out", str(out)]
    common = [*budget_args, "--epochs", "2", "--subset", "400", "--seed", "1", "--no-anchors"]
    result = compsearch("run", *common, "--trials", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    folder = out / "digits"
    for name in ("study.db", "trials.csv", "pareto.png", "pareto.html", "space.toml"):
        assert (folder / name).is_file(), name
        assert str(folder / name) in result.stdout.replace("\n", "")
    assert (folder / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    frame = pd.read_csv(folder / "trials.csv")
    for column in (
        "number",
        "state",
        "feasible",
        "accuracy",
        "params",
        "size_kb",
        "macs",
        "seconds",
    ):
        assert column in frame.columns
    assert "param_precision" in frame.columns and "param_stage1_width" in frame.columns
    trained = frame[frame["trained"]]
    assert len(trained) == 3
    for _, row in trained.iterrows():
        onnx_file = folder / row["onnx_path"]
        assert row["size_kb"] == onnx_file.stat().st_size / 1000
        assert 0 <= row["accuracy"] <= 1
    feasible = frame[frame["feasible"]]
    assert (feasible["params"] <= budget_params).all()
    assert (feasible["size_kb"] <= budget_kb).all()
    rejected = frame[~frame["trained"]]
    assert len(rejected) > 0, "this seed and budget sample over-budget configs"
    over = (rejected["estimated_params"] > budget_params) | (
        rejected["estimated_size_kb"] > budget_kb
    )
    assert over.all()
    assert rejected["reason"].str.startswith("over budget before training").all()
    assert rejected["accuracy"].isna().all()

    storage = f"sqlite:///{folder / 'study.db'}"
    study = optuna.load_study(study_name="digits", storage=storage)
    for trial in study.trials:
        constraints = dict(trial.constraints)
        row = frame[frame["number"] == trial.number].iloc[0]
        # The default --time gives every config within budget a time constraint of its
        # own, met by every trial that trained; feasible is the budgets' alone.
        seconds = constraints.pop("seconds", None)
        assert (seconds is None) == str(row["reason"]).startswith("over budget before")
        if row["trained"]:
            assert seconds <= 0
        assert set(constraints) == {"params", "size_kb"}
        assert (max(constraints.values()) <= 0) == bool(row["feasible"])

    shown = compsearch("show", "--out", str(out), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    if len(feasible):
        assert "Pareto front" in shown.stdout
        best = feasible["accuracy"].max()
        assert f"{best:.2%}" in shown.stdout
    every = compsearch("show", "--all", "--out", str(out), cwd=tmp_path)
    assert every.returncode == 0 and "over budget before training" in every.stdout

    (folder / "pareto.png").unlink()
    plotted = compsearch("plot", "--out", str(out), cwd=tmp_path)
    assert plotted.returncode == 0, plotted.stderr
    assert (folder / "pareto.png").stat().st_size > 10_000

    # Continuing the study adds trained trials and keeps the old ones.
    again = compsearch("run", *common, "--trials", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    after = pd.read_csv(folder / "trials.csv")
    assert after["trained"].sum() == 4
    assert set(frame["number"]) <= set(after["number"])

    # Other budgets on the same study are refused, naming both, and change nothing.
    clash = compsearch(
        "run", "--budget-params", "2e6", "--budget-kb", "300", "--out", str(out), cwd=tmp_path
    )
    assert clash.returncode == 2
    assert "60000" in clash.stderr and "2000000" in clash.stderr
    study = optuna.load_study(study_name="digits", storage=storage)
    assert len(study.trials) == len(after)


def test_a_macs_budget_rejects_configs_over_it_and_trains_only_those_within(tmp_path):
    """Params and KB budgets above anything the space holds, so the MACs budget, met by a
    third of random configs, is the only one that binds. No pruning: a trial's MACs are
    then exactly its estimate."""
    space_file = tmp_path / "macs.toml"
    space_file.write_text(
        "stages = 2\nstem_width = [8, 16]\nwidth = [8, 32]\nprune_fraction = [0.0, 0.0]\n"
    )
    space = load_space(space_file, space_for(1, 10, 8))
    estimated = sorted(estimate(config).macs for config in sampled_configs(space, 30, seed=0))
    budget = estimated[len(estimated) // 3]
    result = compsearch(
        "run", "--budget-params", "1e6", "--budget-kb", "2000", "--budget-macs", str(budget),
        "--space", str(space_file), "--epochs", "2", "--subset", "200", "--trials", "2",
        "--out", "runs", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    folder = tmp_path / "runs" / "digits"
    frame = pd.read_csv(folder / "trials.csv")
    trained = frame[frame["trained"]]
    assert len(trained) == 2 and trained["feasible"].all()
    assert (trained["macs"] <= budget).all()
    assert (trained["macs"] == trained["estimated_macs"]).all()
    rejected = frame[~frame["trained"]]
    assert len(rejected) > 0, "this seed samples configs over the MACs budget"
    for _, row in rejected.iterrows():
        assert row["estimated_macs"] > budget
        over = f"macs {amount(row['estimated_macs'])} > {amount(budget)}"
        assert row["reason"] == f"over budget before training: {over}"
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{folder / 'study.db'}")
    assert study.user_attrs[SETTINGS_KEY]["budgets"]["macs"] == budget
    for trial in study.trials:
        row = frame[frame["number"] == trial.number].iloc[0]
        macs = row["macs"] if row["trained"] else row["estimated_macs"]
        budget_constraints = {k: v for k, v in trial.constraints.items() if k != "seconds"}
        assert set(budget_constraints) == {"params", "size_kb", "macs"}
        assert trial.constraints["macs"] == pytest.approx(macs / budget - 1)
        assert (max(budget_constraints.values()) <= 0) == bool(row["feasible"])


def test_show_without_a_study_says_so(tmp_path):
    result = compsearch("show", "--out", str(tmp_path / "nothing"), cwd=tmp_path)
    assert result.returncode == 2
    assert "no study under" in result.stderr


def test_budgets_reject_non_finite_values():
    from compsearch.spaces.budgets import Budgets

    with pytest.raises(ValueError):
        Budgets(params=math.nan, size_kb=300)


def test_a_resumed_study_seeds_its_sampler_past_the_trials_it_has(tmp_path):
    from compsearch.search.study import existing_trials, open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert existing_trials(storage, "digits") == 0
    study = optuna.create_study(storage=storage, study_name="digits")
    for _ in range(3):
        study.tell(study.ask(), 1.0)
    optuna.create_study(storage=storage, study_name="other")
    assert existing_trials(storage, "digits") == 3
    assert existing_trials(storage, "other") == 0


def test_a_space_file_is_searched_written_beside_the_study_and_kept(tmp_path):
    out = tmp_path / "runs"
    space_file = tmp_path / "narrow.toml"
    space_file.write_text('blocks = ["dwsep"]\nprecisions = ["int8"]\nwidth = [8, 16]\n')
    # Budgets above anything this space holds: reported, and the run goes on.
    common = ["--budget-params", "1e9", "--budget-kb", "1e6", "--out", str(out)]
    common += ["--epochs", "2", "--subset", "200", "--trials", "2"]
    result = compsearch("run", *common, "--space", str(space_file), cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    stdout = result.stdout.replace("\n", " ")
    assert "--budget-params 1,000,000,000 is above the largest model the space holds" in stdout
    assert "does not constrain this search" in stdout
    written = (out / "digits" / "space.toml").read_text()
    assert 'blocks = ["dwsep"]' in written and 'precisions = ["int8"]' in written
    frame = pd.read_csv(out / "digits" / "trials.csv")
    assert (frame["param_stage1_block"] == "dwsep").all()
    assert (frame["param_precision"] == "int8").all()

    # The study keeps its space: another one is refused, the written one is accepted.
    space_file.write_text('blocks = ["basic"]\n')
    clash = compsearch("run", *common, "--space", str(space_file), cwd=tmp_path)
    assert clash.returncode == 2 and "another search space" in clash.stderr
    again = compsearch(
        "run",
        *common,
        "--space",
        str(out / "digits" / "space.toml"),
        "--trials",
        "1",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert pd.read_csv(out / "digits" / "trials.csv")["trained"].sum() == 3


def test_budgets_below_the_smallest_model_name_it_and_how_to_widen_the_space(tmp_path):
    result = compsearch(
        "run", "--budget-params", "2e6", "--budget-kb", "1", "--out", str(tmp_path), cwd=tmp_path
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "the smallest reachable has" in line and "KB" in line and "--space" in line
    assert list(tmp_path.iterdir()) == []


def test_a_teacher_file_that_does_not_fit_exits_2_before_training(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a model")
    arch = teacher_arch(3, 100)  # CIFAR-100's shape, not digits'
    save_model(tmp_path / "cifar100.pt", build(arch), arch)
    for name, message in (("garbage.pt", "is not a model file"), ("cifar100.pt", "100 classes")):
        result = compsearch(
            "run", "--budget-params", "50k", "--budget-kb", "50", "--teacher", name,
            "--out", "runs", cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "runs").exists()


def test_teacher_auto_is_trained_once_then_reused(tmp_path):
    common = ["--budget-params", "50k", "--budget-kb", "50", "--epochs", "2", "--subset", "200"]
    common += ["--teacher", "auto", "--trials", "1", "--out", "runs"]
    first = compsearch("run", *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr + first.stdout
    cached = tmp_path / "runs" / "teachers" / "digits-seed0-subset200.pt"
    assert "training one for digits" in first.stdout and cached.is_file()
    stamp = cached.stat().st_mtime_ns
    again = compsearch("run", *common, cwd=tmp_path)
    assert again.returncode == 0, again.stderr + again.stdout
    assert "training one" not in again.stdout and "teacher:" in again.stdout
    assert cached.stat().st_mtime_ns == stamp
    saved = load_model(cached)
    assert saved.arch == teacher_arch(1, 10) and 0 <= saved.facts["val_accuracy"] <= 1
