"""The command line: `compsearch run | show | plot | export`. It turns arguments into the
calls of search/api.py and their results into text, and nothing else."""

from __future__ import annotations

import argparse
import math
import re
import signal
import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from compsearch import __version__
from compsearch.objectives.catalog import DISTILL_TEMPERATURE, DISTILL_WEIGHT
from compsearch.search import api
from compsearch.search.common import (
    DEFAULT_EPOCHS,
    DEFAULT_FIDELITY,
    DEFAULT_OUT,
    DEFAULT_RUNGS,
    DEFAULT_TIME,
    DEFAULT_TRIALS,
    EXIT_USAGE,
    EXPORT_EPOCH_FACTOR,
    GRACE_HEARTBEATS,
    HEARTBEAT_SECONDS,
    SAMPLERS,
    SPACE_FILE,
    UsageError,
)
from compsearch.search.options import ExportOptions, Location, RunOptions, WorkerRole
from compsearch.search.summaries import ExportSummary, RunSummary, StudyView
from compsearch.search.supervise import (
    REPORT_FD_FLAG,
    Reporter,
    launcher,
    request_stop,
    supervise_export,
    supervise_run,
)

DESCRIPTION = (
    "Find the most accurate image classifier that fits hard deployment budgets: run searches, "
    "show and plot the Pareto front, export the best model."
)
# Every error a user's input can cause, where it lives: main() prints it as one line and
# exits 2. Named rather than imported, so that the command line loads none of their
# modules before a command needs them.
EXPECTED_ERRORS = (
    "compsearch.search.common.UsageError",
    "compsearch.objectives.errors.DataError",
    "compsearch.spaces.space.SpaceError",
    "compsearch.results.export.ExportError",
    "compsearch.results.records.NotCompsearchStudy",
)
_SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_amount(text: str, what: str, examples: str = "2e6, 2000000 or 2M") -> float:
    """'2e6', '2000000', '2M', '300k', '1.5G' -> float; anything else is a usage error."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmg]?)\s*", text.lower())
    value = float(match.group(1)) * _SUFFIXES[match.group(2)] if match else math.nan
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{what} must be a number > 0 such as {examples}, but got {text!r}")
    return value


def parse_count(text: str, what: str) -> int:
    value = parse_amount(text, what, examples="4, 100 or 1k")
    if value != int(value):
        raise UsageError(f"{what} must be a whole number, but got {text!r}")
    return int(value)


def parse_fraction(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise UsageError(f"{what} must be a number from 0 to 1, but got {text!r}")
    return value


DURATION = re.compile(
    r"(?:(?P<h>[0-9]*\.?[0-9]+)h)?(?:(?P<m>[0-9]*\.?[0-9]+)m)?(?:(?P<s>[0-9]*\.?[0-9]+)s?)?"
)


def parse_duration(text: str, what: str) -> float:
    """'90s', '20m', '1h30m', '1.5h', '45' (seconds) -> seconds; 'M' (minutes or
    million?) and anything else is a usage error."""
    compact = text.strip().replace(" ", "")
    if re.fullmatch(r"[0-9.]+[KMG]", compact):
        raise UsageError(
            f"{what} {text!r} is ambiguous: write minutes as {compact[:-1]}m (units: s, m, h)"
        )
    match = DURATION.fullmatch(compact.lower()) if compact else None
    seconds = math.nan
    if match and any(match.groups()):
        hours, minutes, rest = (float(part or 0) for part in match.group("h", "m", "s"))
        seconds = hours * 3600 + minutes * 60 + rest
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(
            f"{what} must be a duration > 0 such as 90s, 20m or 1h30m (a bare number is "
            f"seconds), but got {text!r}"
        )
    return seconds


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2, and takes no
    abbreviated option (a misspelt --tim must not pass for --time)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> Parser:
    parser = Parser(prog="compsearch", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"compsearch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def add_location(command: argparse.ArgumentParser) -> None:
        command.add_argument("--study", help="study name (default: the dataset's name)")
        command.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
        command.add_argument(
            "--storage",
            help="Optuna storage URL (sqlite:///, postgresql://, mysql://, redis://) or a "
            "journal file path (default: OUT/STUDY/study.db)",
        )

    run = commands.add_parser("run", help="search for the best model within the budgets")
    run.add_argument("--budget-params", required=True, help="max parameters, e.g. 2e6 or 2M")
    run.add_argument("--budget-kb", required=True, help="max ONNX file size in KB (1000 bytes)")
    run.add_argument("--budget-macs", help="max multiply-accumulates per image")
    run.add_argument(
        "--budget-ram",
        help="max peak activation memory of one inference in KB (1000 bytes), as a "
        "sequential runtime holds the tensors in the file's precision",
    )
    run.add_argument(
        "--budget-latency",
        help="max median single-image latency of the file in ms: onnxruntime, one thread, "
        "on the machine that runs the search",
    )
    run.add_argument(
        "--objectives",
        default="accuracy,size",
        help="what the search optimizes: accuracy,size (default: the most accurate model per "
        "file size) or accuracy,size,latency (also the fastest, as --budget-latency times it)",
    )
    run.add_argument(
        "--format",
        default="onnx",
        help="the file each trial is measured as: onnx (default) or tflite (int8 .tflite "
        "files run in LiteRT, every trial int8; needs compsearch[tflite])",
    )
    run.add_argument(
        "--dataset",
        default="digits",
        help="digits (default), mnist, fashion-mnist, cifar10, cifar100, svhn, stl10 or "
        "folder:PATH (one sub-folder of images per class)",
    )
    run.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="folder holding the dataset's files, or a parent of it (default: ./data)",
    )
    run.add_argument("--trials", default=str(DEFAULT_TRIALS), help="trained trials to add")
    run.add_argument(
        "--time",
        "--timeout",
        dest="time",
        default=f"{DEFAULT_TIME / 60:g}m",
        help="wall time of the search, such as 90s, 20m or 1h30m (a bare number is seconds), "
        "or none: no trial starts whose predicted end lies past it, and no trial may take "
        "more than a third of it (default: %(default)s; --timeout is an alias)",
    )
    run.add_argument("--sampler", default="tpe", help=f"one of {', '.join(SAMPLERS)}")
    run.add_argument(
        "--subset",
        help="the training images the search draws on (stratified; default all): the top "
        "rung trains on all of them, lower rungs on fewer",
    )
    run.add_argument("--space", help="TOML file narrowing or widening the search space")
    run.add_argument(
        "--epochs",
        default=str(DEFAULT_EPOCHS),
        help="epochs of a trial at the top rung; lower rungs train fewer (default %(default)s)",
    )
    run.add_argument(
        "--rungs",
        default=str(DEFAULT_RUNGS),
        help="fidelities of the successive halving: new configs train at the lowest, each "
        "rung a third of the training of the next, and the non-dominated third of each "
        "rung's trials is trained again at the next; 1: every trial trains --epochs on all "
        "--subset images (default %(default)s)",
    )
    run.add_argument(
        "--fidelity",
        default=DEFAULT_FIDELITY,
        help="what a rung counts: epochs (each trial trains the rung's epochs) or seconds "
        "(every config at a rung trains for the same predicted seconds, a fast one more "
        "epochs than a slow one; the top rung's are what a typical config of the space "
        "takes for --epochs) (default %(default)s)",
    )
    run.add_argument("--seed", default="0", help="seed of the sampler, splits and training")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K")
    run.add_argument(
        "--teacher",
        default="none",
        help="distil from a teacher: none (default), auto (train a large one once per "
        "dataset and cache it under OUT/teachers) or the path of a model.pt",
    )
    run.add_argument(
        "--distill-weight",
        default=str(DISTILL_WEIGHT),
        help=f"share of the loss from the teacher, 0 to 1 (default {DISTILL_WEIGHT})",
    )
    run.add_argument(
        "--distill-temperature",
        default=str(DISTILL_TEMPERATURE),
        help=f"softening of the teacher's outputs (default {DISTILL_TEMPERATURE})",
    )
    run.add_argument(
        "--workers",
        default="1",
        help="worker processes on this machine sharing the study: one per GPU when there "
        "are several, else side by side sharing the CPU cores or the GPU (default 1)",
    )
    run.add_argument(
        "--heartbeat",
        default=str(HEARTBEAT_SECONDS),
        help="seconds between a worker's heartbeats; a trial whose worker misses "
        f"{GRACE_HEARTBEATS} in a row is failed and run again (default {HEARTBEAT_SECONDS})",
    )
    run.add_argument(
        "--no-anchors",
        dest="anchors",
        action="store_false",
        help="leave out the known architectures (ResNet-8, ResNet-20, a MobileNetV2 and a "
        "DS-CNN, fitted to the budgets) that a new study otherwise trains first",
    )
    # Set by `--workers` for the processes it starts.
    run.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    run.add_argument("--finish-at", type=int, help=argparse.SUPPRESS)
    run.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    run.add_argument(REPORT_FD_FLAG, type=int, help=argparse.SUPPRESS)
    add_location(run)

    show = commands.add_parser("show", help="print the feasible Pareto front")
    show.add_argument("--all", action="store_true", help="list every trial with its state")
    add_location(show)

    plot = commands.add_parser(
        "plot",
        help="write pareto.png, pareto.html, history.png, importance.png and report.html",
    )
    add_location(plot)

    export = commands.add_parser(
        "export", help="retrain a trial for longer, verify it and write the deployable model"
    )
    export.add_argument(
        "--trial", default="best", help="best (the most accurate feasible trial) or a number"
    )
    export.add_argument(
        "--epochs",
        help=f"training epochs (default: {EXPORT_EPOCH_FACTOR} times the trial's)",
    )
    export.add_argument(
        "--time",
        help="wall time of the export's training instead of --epochs, such as 20m: the "
        "epochs are sized from the trial's own seconds per image and epoch",
    )
    export.add_argument(
        "--teacher", help="none, auto or a model.pt path (default: what the study used)"
    )
    export.add_argument(
        "--data-dir",
        type=Path,
        help="where the dataset's files are now (default: where the study read them)",
    )
    export.add_argument(
        "--flip",
        action="store_true",
        help="horizontal-flip test-time augmentation in the file: it averages the outputs "
        "on each image and its mirror, at twice the MACs (counted against --budget-macs)",
    )
    export.add_argument(
        "--format",
        help="onnx (model.onnx) or tflite: also an int8 model.tflite, measured in LiteRT, "
        "and its C array for TensorFlow Lite Micro (needs compsearch[tflite]); default: the "
        "study's run --format",
    )
    export.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K")
    export.add_argument(REPORT_FD_FLAG, type=int, help=argparse.SUPPRESS)
    add_location(export)
    return parser


def entry(argv: list[str] | None = None) -> int:
    """The `compsearch` program: `run` and `export` run in a supervised child process (see
    search/supervise.py), so a native crash costs a trial, not the search."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command not in ("run", "export") or args.report_fd is not None:
        return main(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr if line.startswith("error:") else sys.stdout, flush=True)

    if args.command == "export":
        return supervise_export([*launcher(), *argv], say)
    return supervise_run([*launcher(), *argv], say)


def main(argv: list[str] | None = None) -> int:
    """The commands, in this process; every expected error becomes one line and exit 2."""
    args = build_parser().parse_args(argv)
    if args.command in ("run", "export"):
        # `kill PID` stops a run as Ctrl-C does: the trial is failed and queued again.
        signal.signal(signal.SIGTERM, request_stop)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, request_stop)
    console = Console()
    try:
        if args.command == "run":
            return command_run(args, console)
        if args.command == "show":
            return command_show(args, console)
        if args.command == "export":
            return command_export(args, console)
        return command_plot(args, console)
    except Exception as error:
        if not expected(error):
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


def expected(error: Exception) -> bool:
    """Whether `error` is one of EXPECTED_ERRORS (or a subclass of one)."""
    return any(
        f"{kind.__module__}.{kind.__qualname__}" in EXPECTED_ERRORS for kind in type(error).__mro__
    )


def run_options(args: argparse.Namespace) -> RunOptions:
    """`run`'s arguments, parsed and checked, in the order a user reads them."""
    budgets = (
        parse_amount(args.budget_params, "--budget-params"),
        parse_amount(args.budget_kb, "--budget-kb"),
        parse_amount(args.budget_macs, "--budget-macs") if args.budget_macs else None,
        parse_amount(args.budget_ram, "--budget-ram") if args.budget_ram else None,
        parse_amount(args.budget_latency, "--budget-latency") if args.budget_latency else None,
    )
    trials = parse_count(args.trials, "--trials")
    epochs = parse_count(args.epochs, "--epochs")
    subset = parse_count(args.subset, "--subset") if args.subset else None
    time = None if args.time.strip().lower() == "none" else parse_duration(args.time, "--time")
    if not re.fullmatch(r"[0-9]+", args.seed.strip()):
        raise UsageError(f"--seed must be a whole number >= 0, but got {args.seed!r}")
    return RunOptions(
        *budgets,
        dataset=args.dataset,
        data_dir=args.data_dir,
        trials=trials,
        time=time,
        sampler=args.sampler,
        subset=subset,
        space=Path(args.space) if args.space else None,
        epochs=epochs,
        seed=int(args.seed),
        device=args.device,
        teacher=args.teacher,
        distill_weight=parse_fraction(args.distill_weight, "--distill-weight"),
        distill_temperature=parse_amount(args.distill_temperature, "--distill-temperature"),
        workers=parse_count(args.workers, "--workers"),
        heartbeat=parse_count(args.heartbeat, "--heartbeat"),
        anchors=args.anchors,
        rungs=parse_count(args.rungs, "--rungs"),
        fidelity=args.fidelity,
        study=args.study,
        out=args.out,
        storage=args.storage,
        objectives=args.objectives,
        format=args.format,
    )


def command_run(args: argparse.Namespace, console: Console) -> int:
    options = run_options(args)
    role = WorkerRole(args.worker_index, args.finish_at, args.threads, tuple(launcher()))
    summary = api.run_job(options, console, role, Reporter(args.report_fd))
    if role.index > 0:
        return summary.exit_code
    print_front(console, summary.view)
    if summary.interrupted:
        console.print(
            f"stopped by Ctrl-C after {summary.seconds:.0f} s; every finished trial is kept in "
            "the study"
        )
        return summary.exit_code
    console.print(run_line(summary))
    if summary.view is not None and summary.view.prediction_errors is not None:
        console.print(summary.view.prediction_errors.describe())
    print_paths(console, summary)
    return summary.exit_code


def run_line(summary: RunSummary) -> str:
    """How the run's trials went, in one line."""
    counts = summary.counts
    asked = (
        counts.trained + counts.rejected + counts.too_slow + counts.failed + counts.stopped_early
    )
    by_rung = ", ".join(
        f"{count} at rung {rung + 1}" for rung, count in sorted(counts.trained_per_rung.items())
    )
    line = (
        f"{counts.trained} trials trained"
        + (f" ({by_rung})" if len(counts.trained_per_rung) > 1 else "")
        + f" in {summary.seconds:.0f} s; {counts.rejected} of "
        f"{asked} sampled configs ({counts.rejected / max(1, asked):.0%}) over budget by "
        "estimate and never trained"
    )
    if counts.too_slow:
        line += f", {counts.too_slow} predicted too slow for the time left"
    if counts.fitted:
        line += f" ({counts.fitted} shrunk copies of them queued to fit the budgets)"
    if counts.stopped_early:
        line += (
            f"; {counts.stopped_early} stopped early, saving {counts.epochs_saved} of "
            f"{counts.epochs_trained + counts.epochs_saved} epochs"
        )
    line += f"; {counts.infeasible_after_training} over budget as measured, {counts.failed} failed"
    if counts.stopped_reason:
        line += f"; stopped: {counts.stopped_reason}"
    return line


def print_front(console: Console, view: StudyView) -> None:
    from compsearch.results.table import front_table, pareto_front  # pandas: only to print

    if view.front:
        title = f"Feasible Pareto front of {view.title}"
        first = view.front[0]
        if first.rungs > 1 and first.config is not None:
            shape = (
                f"{first.fidelity_seconds:.0f} s"
                if first.fidelity_seconds is not None
                else f"{first.config.train.epochs} epochs"
            )
            title += (
                f", trials at the highest fidelity reached (rung {first.rung + 1} of "
                f"{first.rungs}: {shape} of {first.train_images:,} images)"
            )
        console.print(front_table(pareto_front(view.frame), title))
    else:
        console.print("no feasible trial yet")


def print_paths(console: Console, summary: RunSummary) -> None:
    console.print("written:")
    if summary.storage.startswith("sqlite:///"):
        console.print(f"  {summary.storage.removeprefix('sqlite:///')}  (the Optuna study)")
    else:
        console.print(f"  {summary.storage}  (the Optuna study)")
    for path in [*summary.written, summary.folder / SPACE_FILE, summary.folder / "trials"]:
        if path.exists():
            console.print(f"  {path}")


def location(args: argparse.Namespace) -> Location:
    return Location(args.study, args.out, args.storage)


def command_show(args: argparse.Namespace, console: Console) -> int:
    from compsearch.results.table import all_trials_table, study_counts  # pandas: to print

    view = api.show_job(location(args), console)
    console.print(study_counts(view.frame))
    if view.prediction_errors is not None:
        console.print(view.prediction_errors.describe())
    if args.all:
        console.print(all_trials_table(view.frame, f"All trials of {view.title}"))
    elif not view.front:
        console.print(f"{view.title}: no feasible trial yet ({len(view.records)} trials)")
    else:
        print_front(console, view)
    return 0


def command_plot(args: argparse.Namespace, console: Console) -> int:
    for path in api.plot_job(location(args), console):
        console.print(f"written: {path}")
    return 0


def command_export(args: argparse.Namespace, console: Console) -> int:
    options = ExportOptions(
        trial=args.trial,
        epochs=parse_count(args.epochs, "--epochs") if args.epochs else None,
        time=parse_duration(args.time, "--time") if args.time else None,
        teacher=args.teacher,
        data_dir=args.data_dir,
        device=args.device,
        study=args.study,
        out=args.out,
        storage=args.storage,
        flip=args.flip,
        format=args.format,
    )
    print_export(console, api.export_job(options, console, Reporter(args.report_fd)))
    return 0


def print_export(console: Console, exported: ExportSummary) -> None:
    card = exported.card
    console.print(
        f"trial {card['trial']} exported: test accuracy {card['test_accuracy']:.2%}, "
        f"validation {card['validation_accuracy']:.2%} (onnxruntime, on model.onnx); "
        f"{card['params']:,} params, {card['size_kb']:.1f} KB, {card['precision']}, "
        f"within {exported.budgets.describe()}"
    )
    for candidate in card.get("candidates", []):
        accuracy = candidate["validation_accuracy"]
        console.print(
            f"  {'*' if candidate['chosen'] else ' '} {candidate['name']}: "
            + (f"{accuracy:.2%} validation, " if accuracy is not None else "")
            + f"{candidate['size_kb']:.1f} KB"
            + ("" if candidate["within_budgets"] else ", over budget")
            + (f" ({candidate['note']})" if candidate["note"] else "")
        )
    tflite = card.get("tflite")
    if tflite:
        console.print(
            f"model.tflite: test accuracy {tflite['test_accuracy']:.2%}, validation "
            f"{tflite['validation_accuracy']:.2%} (LiteRT), {tflite['size_kb']:.1f} KB, "
            f"peak memory {tflite['ram_kb']:.1f} KB, int8 from the {tflite['source']} model"
        )
    for file in card["files"]:
        console.print(f"  {exported.folder / file}")
    console.print(f"  {exported.folder / 'model.json'}")
    console.print(f"  {exported.report}")


if __name__ == "__main__":
    raise SystemExit(entry())
