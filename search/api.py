"""compsearch as Python calls: `run`, `export`, `show` and `plot`, with the command's
arguments and a typed result. `compsearch run --budget-params 2e6 --budget-kb 300` is

    import compsearch
    summary = compsearch.run(budget_params=2e6, budget_kb=300)
    print(summary.view.best)

Bad input raises UsageError (or DataError, SpaceError, ExportError: each says what is
wrong and what to do) before anything is trained or written. The heavy modules load
here, each only once the input it needs has been checked: optuna after the options,
torch after the study's settings and the dataset's files.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from compsearch.objectives.catalog import DISTILL_TEMPERATURE, DISTILL_WEIGHT
from compsearch.search.common import (
    DEFAULT_EPOCHS,
    DEFAULT_FIDELITY,
    DEFAULT_OUT,
    DEFAULT_RUNGS,
    DEFAULT_TIME,
    DEFAULT_TRIALS,
    HEARTBEAT_SECONDS,
)
from compsearch.search.options import ExportOptions, Location, RunOptions, WorkerRole
from compsearch.search.summaries import ExportSummary, RunSummary, StudyView
from compsearch.search.supervise import Reporter


def run(
    budget_params: float,
    budget_kb: float,
    *,
    budget_macs: float | None = None,
    budget_ram: float | None = None,
    budget_latency: float | None = None,
    dataset: str = "digits",
    data_dir: Path | str = Path("data"),
    trials: int = DEFAULT_TRIALS,
    time: float | None = DEFAULT_TIME,
    sampler: str = "tpe",
    subset: int | None = None,
    space: Path | str | None = None,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    device: str = "auto",
    teacher: str = "none",
    distill_weight: float = DISTILL_WEIGHT,
    distill_temperature: float = DISTILL_TEMPERATURE,
    workers: int = 1,
    heartbeat: int = HEARTBEAT_SECONDS,
    anchors: bool = True,
    rungs: int = DEFAULT_RUNGS,
    fidelity: str = DEFAULT_FIDELITY,
    study: str | None = None,
    out: Path | str = DEFAULT_OUT,
    storage: str | None = None,
    objectives: str | tuple[str, ...] = "accuracy,size",
    format: str = "onnx",
    quiet: bool = False,
) -> RunSummary:
    """Search for the most accurate model within the budgets, as `compsearch run` does
    (see its --help for each argument), in this process; `quiet` shows no progress.
    `time` is the search's wall time in seconds (None: no limit).

    Returns what the run did and the study as it then stands (`summary.view.front`, the
    feasible Pareto front, most accurate first). Ctrl-C stops it after the current trial
    is failed and queued again; the summary then says `interrupted`.
    """
    options = RunOptions(
        budget_params, budget_kb, budget_macs, budget_ram, budget_latency, dataset, data_dir,
        trials, time, sampler, subset, space, epochs, seed, device, teacher, distill_weight,
        distill_temperature, workers, heartbeat, anchors, rungs, fidelity, study, out,
        storage, objectives, format,
    )  # fmt: skip
    return run_job(options, Console(quiet=quiet))


def run_job(
    options: RunOptions,
    console: Console,
    role: WorkerRole | None = None,
    reporter: Reporter | None = None,
) -> RunSummary:
    """`run` for checked options; `role` and `reporter` are the command line's (a worker
    process of `--workers`, the pipe to the supervisor)."""
    space = options.known_space()
    from compsearch.search.prepare import prepare_run  # optuna

    prepared = prepare_run(options, space, console)
    from compsearch.search.jobs import execute_run  # torch

    return execute_run(prepared, console, role or WorkerRole(), reporter or Reporter(None))


def export(
    trial: int | str = "best",
    *,
    epochs: int | None = None,
    time: float | None = None,
    teacher: str | None = None,
    data_dir: Path | str | None = None,
    device: str = "auto",
    study: str | None = None,
    out: Path | str = DEFAULT_OUT,
    storage: str | None = None,
    quiet: bool = False,
    flip: bool = False,
    format: str | None = None,
) -> ExportSummary:
    """Retrain a trial for longer, verify its file against the budgets and write
    OUT/STUDY/export/ (model.onnx, model.pt, model.json), as `compsearch export` does.
    `time`: seconds of training instead of `epochs`, sized from the trial's own speed.
    `flip`: the file averages the outputs on each image and its mirror (twice the MACs).
    `format="tflite"`: also an int8 model.tflite measured in LiteRT, and its C array;
    None: the study's own `run` format."""
    options = ExportOptions(
        trial, epochs, time, teacher, data_dir, device, study, out, storage, flip, format
    )
    return export_job(options, Console(quiet=quiet))


def export_job(
    options: ExportOptions, console: Console, reporter: Reporter | None = None
) -> ExportSummary:
    from compsearch.search.prepare import prepare_export  # optuna

    prepared = prepare_export(options, console)
    from compsearch.search.jobs import execute_export  # torch

    return execute_export(prepared, console, reporter or Reporter(None))


def show(
    study: str | None = None,
    *,
    out: Path | str = DEFAULT_OUT,
    storage: str | None = None,
    quiet: bool = True,
) -> StudyView:
    """The study's trials and its feasible Pareto front, as `compsearch show` lists them."""
    return show_job(Location(study, out, storage), Console(quiet=quiet))


def show_job(location: Location, console: Console) -> StudyView:
    from compsearch.search.study import locate_study  # optuna
    from compsearch.search.views import view_of  # pandas

    return view_of(*locate_study(location, console.print))


def plot(
    study: str | None = None,
    *,
    out: Path | str = DEFAULT_OUT,
    storage: str | None = None,
    quiet: bool = True,
) -> list[Path]:
    """Write trials.csv, the figures and report.html beside the study; the paths."""
    return plot_job(Location(study, out, storage), Console(quiet=quiet))


def plot_job(location: Location, console: Console) -> list[Path]:
    from compsearch.results.files import write_study_files  # pandas, matplotlib
    from compsearch.search.study import locate_study  # optuna

    return write_study_files(*locate_study(location, console.print))
