"""The Python API: compsearch.run, show, plot and export, the same jobs as the command
line, with typed arguments and results."""

from __future__ import annotations

import dataclasses
import json
import math

import optuna
import pytest

import compsearch
from compsearch.objectives.errors import DataError
from compsearch.results.export import ExportError
from compsearch.results.records import TrialRecord, read_trials, study_settings
from compsearch.search.cli import build_parser, run_options
from compsearch.search.common import UsageError
from compsearch.search.options import RunOptions
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.space import SpaceError

SMALL = dict(budget_params=50e3, budget_kb=50, trials=2, epochs=2, subset=200, device="cpu")


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "runs"
    return out, compsearch.run(**SMALL, out=out, quiet=True)


def test_run_returns_what_it_did_and_the_study_as_it_stands(searched):
    out, summary = searched
    assert summary.study == "digits" and summary.folder == out / "digits"
    assert summary.exit_code == 0 and not summary.interrupted
    assert summary.counts.trained == 2
    assert [r.anchor for r in summary.view.records[:2]] == ["resnet8", "resnet20"]
    study = optuna.load_study(study_name="digits", storage=summary.storage)
    assert [r.number for r in summary.view.records] == [t.number for t in study.trials]
    budgets = Budgets(50e3, 50)
    assert study_settings(study).budgets == budgets == summary.view.budgets
    trained = [r for r in summary.view.records if r.trained]
    assert len(trained) == 2 and all(isinstance(r, TrialRecord) for r in trained)
    assert summary.view.front, "two trained digits trials hold a feasible one"
    for record in summary.view.front:
        assert record.feasible(budgets) and record.params <= 50e3 and record.size_kb <= 50
    best = max((r for r in trained if r.feasible(budgets)), key=lambda r: r.accuracy)
    assert summary.view.best.accuracy == best.accuracy
    assert {path.name for path in summary.written} >= {"trials.csv", "report.html", "pareto.png"}
    assert all(path.is_file() for path in summary.written)


def test_show_reads_the_same_records_the_storage_holds(searched):
    out, summary = searched
    view = compsearch.show(out=out)
    study = optuna.load_study(study_name="digits", storage=summary.storage)
    assert list(view.records) == read_trials(study.trials)
    assert view.front == summary.view.front
    assert len(view.frame) == len(view.records)


def test_plot_writes_the_files_it_returns(searched):
    out, _ = searched
    written = compsearch.plot("digits", out=out)
    assert written[-1].name == "report.html" and all(path.is_file() for path in written)


def test_export_retrains_the_best_trial_and_returns_its_card(searched):
    out, summary = searched
    exported = compsearch.export(epochs=2, out=out, device="cpu", quiet=True)
    assert exported.folder == out / "digits" / "export"
    card = json.loads((exported.folder / "model.json").read_text())
    assert card == json.loads(json.dumps(exported.card))  # tuples read back as lists
    assert card["trial"] == summary.view.best.number and card["epochs"] == 2
    assert card["size_kb"] <= 50 and card["params"] <= 50e3
    assert math.isclose(card["size_kb"], (exported.folder / "model.onnx").stat().st_size / 1000)


def bad_run(**arguments):
    arguments = {"budget_params": 1e6, "budget_kb": 50, **arguments}
    return lambda out: compsearch.run(**arguments, out=out)


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (bad_run(budget_kb=-1), UsageError, "--budget-kb must be"),
        (bad_run(epochs=1), UsageError, "at least 2"),
        (bad_run(trials=2.5), UsageError, "whole number"),
        (bad_run(sampler="grid"), UsageError, "sampler"),
        (bad_run(dataset="imagenet"), UsageError, "dataset"),
        (bad_run(study="../x"), UsageError, "--study"),
        (bad_run(space="no.toml"), SpaceError, "no.toml"),
        (bad_run(dataset="mnist", data_dir="."), DataError, "mnist"),
        (lambda out: compsearch.export("first", out=out), UsageError, "--trial"),
        (lambda out: compsearch.show(out=out), UsageError, "no study"),
    ],
)
def test_bad_arguments_raise_before_anything_is_written(tmp_path, monkeypatch, call, error, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=words):
        call(tmp_path / "runs")
    assert list(tmp_path.iterdir()) == []


def test_exporting_a_trial_never_trained_says_so(searched):
    out, summary = searched
    rejected = next(r for r in summary.view.records if not r.trained)
    with pytest.raises(ExportError, match=f"trial {rejected.number} was never trained"):
        compsearch.export(rejected.number, out=out, quiet=True)


def test_worker_arguments_parse_back_to_the_same_options(tmp_path):
    """A worker process of `--workers` is started with `options.to_argv()`: parsed again,
    it must mean the same search."""
    options = RunOptions(
        1234567, 299.5, budget_macs=3e6, dataset="mnist", data_dir=tmp_path, trials=7,
        time=90.5, sampler="nsga2", subset=1000, epochs=5, seed=3, teacher="auto",
        distill_weight=0.25, distill_temperature=2.5, workers=3, heartbeat=4, anchors=False,
        rungs=2, fidelity="seconds", study="s",
        out=tmp_path / "runs", storage=str(tmp_path / "journal.log"),
        objectives="latency,accuracy,size",
    )  # fmt: skip
    parsed = run_options(build_parser().parse_args(["run", *options.to_argv()]))
    assert parsed == options
    default = RunOptions(2e6, 300)
    assert run_options(build_parser().parse_args(["run", *default.to_argv()])) == default
    assert dataclasses.replace(default, seed=1).to_argv()[-2:] == ["--seed", "1"]


def test_a_run_with_latency_as_third_objective_reports_it(tmp_path, capsys):
    """--objectives accuracy,size,latency: a study of three directions whose settings say
    so, the figure with a latency panel, and `show` with a latency column."""
    summary = compsearch.run(**SMALL, objectives="accuracy,size,latency", out=tmp_path, quiet=True)
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{summary.folder}/study.db")
    assert len(study.directions) == 3 and study.metric_names == [
        "accuracy",
        "size_kb",
        "latency_ms",
    ]
    assert study_settings(study).objectives == ("accuracy", "size", "latency")
    trained = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert trained and all(len(t.values) == 3 for t in trained)
    assert summary.view.front
    html = (summary.folder / "pareto.html").read_text()
    assert "accuracy against latency" in html
    assert "Objectives: accuracy, size, latency." in (summary.folder / "report.html").read_text()
    from compsearch.search.cli import main

    assert main(["show", "--out", str(tmp_path)]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps the caption
    assert "ms: median single-image latency, one thread" in printed


def test_a_python_run_with_two_workers_shares_one_study(tmp_path):
    """`workers=2` from Python starts the second worker with this interpreter, on the
    same study; together they finish exactly the trials asked for."""
    summary = compsearch.run(**{**SMALL, "trials": 3}, workers=2, out=tmp_path, quiet=True)
    log = (tmp_path / "digits" / "workers" / "worker-1.log").read_text()
    assert summary.exit_code == 0, log
    assert "study digits in" in log and "trials so far" in log  # it opened the same study
    finished = [r for r in summary.view.records if r.trained or r.state == "PRUNED"]
    assert len(finished) == 3
