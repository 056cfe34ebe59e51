"""The command line: `compsearch run | show | plot`."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from compsearch import __version__
from compsearch.objectives import catalog
from compsearch.search.common import (
    GRACE_HEARTBEATS,
    HEARTBEAT_SECONDS,
    SAMPLERS,
    SETTINGS_KEY,
    UsageError,
    redact,
    storage_url,
)
from compsearch.search.supervise import (
    REPORT_FD_FLAG,
    Reporter,
    launcher,
    request_stop,
    supervise_export,
    supervise_run,
)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_OUT = Path("runs")
DEFAULT_TRIALS = 40
DEFAULT_EPOCHS = 12
# Repeated from objectives.teacher, which imports torch; the CLI checks input without it.
DISTILL_WEIGHT = 0.5
DISTILL_TEMPERATURE = 4.0
# Repeated from results.export (which imports optuna and pandas), for the help text.
EXPORT_EPOCH_FACTOR = 3
SPACE_FILE = "space.toml"  # the space searched, beside the study
WORKER_SEED_STRIDE = 1009  # sampler seeds of workers started together differ by this
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


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> Parser:
    parser = Parser(prog="compsearch", description=__doc__.splitlines()[0])
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
    run.add_argument("--timeout", help="seconds after which no new trial starts")
    run.add_argument("--sampler", default="tpe", help=f"one of {', '.join(SAMPLERS)}")
    run.add_argument("--subset", help="train each trial on this many training images")
    run.add_argument("--space", help="TOML file narrowing or widening the search space")
    run.add_argument("--epochs", default=str(DEFAULT_EPOCHS), help="epochs per trial")
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
        "--teacher", help="none, auto or a model.pt path (default: what the study used)"
    )
    export.add_argument(
        "--data-dir",
        type=Path,
        help="where the dataset's files are now (default: where the study read them)",
    )
    export.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:K")
    export.add_argument(REPORT_FD_FLAG, type=int, help=argparse.SUPPRESS)
    add_location(export)
    return parser


# How to start a worker process: as a program, entry() sets it to what started this one.
LAUNCHER = [sys.executable, "-m", "compsearch.search.cli"]


def entry(argv: list[str] | None = None) -> int:
    """The `compsearch` program: `run` and `export` run in a supervised child process (see
    search/supervise.py), so a native crash costs a trial, not the search."""
    global LAUNCHER
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    LAUNCHER = launcher()
    if args.command not in ("run", "export") or args.report_fd is not None:
        return main(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr if line.startswith("error:") else sys.stdout, flush=True)

    if args.command == "export":
        return supervise_export([*LAUNCHER, *argv], say)
    return supervise_run([*LAUNCHER, *argv], say)


def main(argv: list[str] | None = None) -> int:
    """The commands, in this process."""
    args = build_parser().parse_args(argv)
    if args.command in ("run", "export"):
        # `kill PID` stops a run as Ctrl-C does: the trial is failed and queued again.
        signal.signal(signal.SIGTERM, request_stop)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, request_stop)
    # What was typed, for the worker processes that `run --workers` starts.
    args.argv = without_report_fd(list(sys.argv[1:] if argv is None else argv))
    console = Console()
    try:
        if args.command == "run":
            return command_run(args, console)
        if args.command == "show":
            return command_show(args, console)
        if args.command == "export":
            return command_export(args, console)
        return command_plot(args, console)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


def without_report_fd(argv: list[str]) -> list[str]:
    """`argv` without the supervisor's pipe, which belongs to this process alone."""
    if REPORT_FD_FLAG not in argv:
        return argv
    index = argv.index(REPORT_FD_FLAG)
    return argv[:index] + argv[index + 2 :]


def data_source(dataset: str, data_dir: Path) -> list[str]:
    """[dataset, data folder], as absolute paths, so `export` finds the same data from
    anywhere."""
    if dataset.startswith("folder:"):
        path = Path(dataset.removeprefix("folder:")).resolve()
        return [f"folder:{path}", str(path)]
    return [dataset, str(Path(data_dir).resolve())]


# A study's name is its folder's name under --out: one path component, never "..".
STUDY_NAME = re.compile(r"\w[\w.+=@-]{0,127}")


def check_study_name(name: str, where: str = "--study") -> str:
    if not STUDY_NAME.fullmatch(name):
        raise UsageError(
            f"{where} {name!r} cannot name a folder under --out: use 1 to 128 letters, digits "
            "and . _ - + = @, starting with a letter, digit or _ (no path separators, no "
            "'..')"
        )
    return name


def check_folder(path: Path, what: str) -> Path:
    """`path` can be a folder (it is one, or can be made): else a usage error, before
    anything is loaded. Nothing is created here."""
    for place in (path, *path.parents):
        if place.exists():
            if place.is_dir():
                return path
            where = "" if place == path else f": {place}"
            raise UsageError(f"{what} {path}{where} is a file, not a folder; give a folder")
    return path


def check_file_path(path: Path, what: str) -> Path:
    """A file that exists or can be written: not a folder, below no file."""
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file path")
    check_folder(path.parent, f"{what}'s folder")
    return path


def check_model_file(path: str, what: str) -> None:
    """A quick look that `path` is a file torch.save wrote (a zip holding data.pkl), so a
    wrong file is refused before torch is imported; load_model reads it in full."""
    import zipfile

    if not Path(path).is_file():
        raise UsageError(f"{what} {path!r} is not a file; give none, auto or a model.pt path")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            pickled = archive.read(names[0]) if names else None
    except (zipfile.BadZipFile, OSError):
        pickled = None
    if pickled is None:
        raise UsageError(
            f"{what} {path} is not a model file (torch.save's format); give none, auto or a "
            "model.pt that compsearch wrote"
        )
    if not holds_state_dict(pickled):
        raise UsageError(f"teacher file {path} holds no state_dict; give a compsearch model.pt")


def holds_state_dict(pickled: bytes) -> bool:
    """Whether a pickle's top object is a dict with a "state_dict" key, read from its
    opcodes without unpickling anything (a model file's tensors need torch to load)."""
    import pickletools

    try:
        opcodes = [op.name for op, _, _ in pickletools.genops(pickled)]
    except Exception:  # not a pickle at all: genops raises several kinds
        return False
    first = next((name for name in opcodes if name not in ("PROTO", "FRAME")), None)
    return first == "EMPTY_DICT" and b"state_dict" in pickled


def check_storage(url: str) -> None:
    """A storage URL's local file, checked as a path before the storage is opened."""
    if url.startswith("sqlite:///"):
        check_file_path(Path(url.removeprefix("sqlite:///")), "--storage")
    elif "://" not in url:
        check_file_path(Path(url), "--storage")


def default_study_name(dataset: str) -> str:
    """The dataset's name; for `folder:PATH`, the name of that folder, with characters a
    study name may not hold replaced by '-'."""
    if dataset.startswith("folder:"):
        name = Path(dataset.removeprefix("folder:")).resolve().name
        return re.sub(r"[^\w.+=@-]", "-", name).lstrip(".-+=@")[:128] or "folder"
    return dataset


DEVICE_NAMES = r"auto|cpu|cuda(:[0-9]+)?"


def check_device_name(name: str) -> None:
    if not re.fullmatch(DEVICE_NAMES, name):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:K, but got {name!r}")


def resolve_device(name: str) -> str:
    check_device_name(name)
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if re.fullmatch(r"cuda(:[0-9]+)?", name):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} asked for, but no CUDA GPU is available; use cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA devices are present"
            )
        return name
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:K, but got {name!r}")


def command_run(args: argparse.Namespace, console: Console) -> int:
    # Everything the user typed is checked before anything is loaded or trained.
    from compsearch.spaces.budgets import Budgets

    budgets = Budgets(
        params=parse_amount(args.budget_params, "--budget-params"),
        size_kb=parse_amount(args.budget_kb, "--budget-kb"),
        macs=parse_amount(args.budget_macs, "--budget-macs") if args.budget_macs else None,
    )
    trials = parse_count(args.trials, "--trials")
    epochs = parse_count(args.epochs, "--epochs")
    if epochs < 2:
        raise UsageError(f"--epochs must be at least 2 (train, then fine-tune), but got {epochs}")
    subset = parse_count(args.subset, "--subset") if args.subset else None
    timeout = parse_amount(args.timeout, "--timeout") if args.timeout else None
    if not re.fullmatch(r"[0-9]+", args.seed.strip()):
        raise UsageError(f"--seed must be a whole number >= 0, but got {args.seed!r}")
    seed = int(args.seed)
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    distill_weight = parse_fraction(args.distill_weight, "--distill-weight")
    distill_temperature = parse_amount(args.distill_temperature, "--distill-temperature")
    if args.teacher not in ("none", "auto"):
        check_model_file(args.teacher, "--teacher")
    workers = parse_count(args.workers, "--workers")
    heartbeat = parse_count(args.heartbeat, "--heartbeat")
    check_device_name(args.device)
    space = requested_space(args)
    reporter = Reporter(args.report_fd)
    study_name = check_study_name(args.study) if args.study else default_study_name(args.dataset)
    check_folder(args.out, "--out")
    check_folder(args.data_dir, "--data-dir")
    folder = args.out / study_name
    url = storage_url(args.storage, folder)
    check_storage(url)

    import optuna

    from compsearch.search.study import open_storage, stored_settings
    from compsearch.spaces.space import SearchSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stored = stored_settings(url, study_name)
    if stored is not None and "space" in stored:
        # A study goes on in the space it was created with.
        stored_space = SearchSpace.from_dict(stored["space"])
        if args.space and space is not None and space != stored_space:
            raise UsageError(
                f"study {study_name!r} was created with another search space (see "
                f"{folder / SPACE_FILE}); pass that file to --space, leave --space out, or "
                "start a new --study"
            )
        space = stored_space
    if stored is not None and stored.get("budgets") != budgets.to_dict():
        # The same check open_study makes, made before the data is read.
        raise UsageError(
            f"study {study_name!r} was created with budgets {json.dumps(stored['budgets'])}, "
            f"not {json.dumps(budgets.to_dict())}; use the original budgets or a new --study"
        )
    if space is not None:
        check_reachable(space, budgets, console)

    from compsearch.objectives.data import DataError, load_dataset

    try:
        # Read before torch is imported, so bad files are refused at once.
        data = load_dataset(
            args.dataset, seed=seed, subset=subset, data_dir=args.data_dir, console=console,
            cache_folder=args.out / catalog.CACHE_FOLDER,
        )  # fmt: skip
    except DataError as error:
        raise UsageError(str(error)) from None

    from compsearch.objectives.teacher import prepare_teacher
    from compsearch.objectives.train import DeviceData
    from compsearch.search.run import (
        SearchSettings,
        default_schedule,
        fail_stale_trials,
        finished_and_running,
        search,
        waiting_trials,
    )
    from compsearch.search.study import existing_trials, make_sampler, open_study

    device = resolve_device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        schedule = default_schedule(epochs, data.resolution)
        on_device = DeviceData(data, device)

        def teacher(spec: str):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            columns = ("teacher epochs", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            reporter.send(step=f"preparing the teacher ({spec})")
            with Progress(*columns, console=console, transient=True) as progress:
                task = progress.add_task("teacher", total=None)
                return prepare_teacher(
                    spec,
                    data,
                    on_device,
                    args.out,
                    schedule,
                    seed,
                    subset,
                    distill_weight,
                    distill_temperature,
                    say=console.print,
                    on_epoch=lambda done, total, _: progress.update(
                        task, completed=done, total=total
                    ),
                )

        # A teacher file is checked before the storage opens; one to train, after.
        distillation = teacher(args.teacher) if args.teacher != "auto" else None
    except DataError as error:
        raise UsageError(str(error)) from None
    storage = open_storage(url, heartbeat)  # only now: bad data leaves no empty study behind
    if space is None:  # a dataset whose shape is known only once loaded
        space = space_for_data(args, data.channels, data.num_classes, data.resolution)
        check_reachable(space, budgets, console)
    settings = {
        "dataset": data.name,
        "budgets": budgets.to_dict(),
        "seed": seed,
        "subset": subset,
        "teacher": args.teacher,
        # Where the data was read, for `export`: the folder itself for folder: datasets.
        "data_source": data_source(args.dataset, args.data_dir),
        "space": space.to_dict(),
        "version": __version__,
    }
    # A resumed study gets a fresh sampler seed so it does not repeat its first proposals,
    # and workers started together get different ones.
    sampler_seed = (
        seed + existing_trials(storage, study_name) + WORKER_SEED_STRIDE * (args.worker_index)
    )
    if args.storage and args.worker_index == 0:
        # Possibly one of several workers started by hand on a shared storage: without its
        # own salt it would propose the same first configs as the others.
        sampler_seed += zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 100_000
    sampler = make_sampler(args.sampler, sampler_seed)
    study = open_study(storage, study_name, settings, sampler)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPACE_FILE).write_text(space.to_toml())
    fail_stale_trials(study)
    waiting = waiting_trials(study)
    before = len(study.trials)
    finish_at = args.finish_at
    if finish_at is None:
        finish_at = finished_and_running(study)[0] + trials
    reporter.send(study=study_name, storage=url, finish_at=finish_at)
    children = start_workers(args, workers, finish_at, device, folder) if workers > 1 else []
    console.print(
        f"study [bold]{study_name}[/] in {redact(url)}: {before} trials so far"
        + (f", {waiting} interrupted or lost trial(s) queued to run again" if waiting else "")
        + (f"; {workers} workers, logs of the others in {folder / 'workers'}" if children else "")
        + f"; dataset {data.name} ({len(data.train)} train, {len(data.val)} validation images,"
        f" {data.resolution}x{data.resolution}x{data.channels}); device {device}"
    )
    run_settings = SearchSettings(
        budgets, trials, timeout, seed, device, folder, finish_at=finish_at
    )
    started = time.perf_counter()
    interrupted = False
    try:
        if args.teacher == "auto":
            try:
                distillation = teacher("auto")
            except DataError as error:
                raise UsageError(str(error)) from None
        counts = search(
            study, space, schedule, data, run_settings, console, distillation, on_device,
            reporter,
        )  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
        counts = None
        for process, _ in children:  # they are in this process's group, not the terminal's
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
    finally:
        failed_workers = wait_for_workers(children, console)
    elapsed = time.perf_counter() - started
    if args.worker_index > 0:  # worker 0 writes the results once all have finished
        return EXIT_INTERRUPTED if interrupted else 0
    written = write_results(study, folder, console)
    if interrupted:
        console.print(
            f"stopped by Ctrl-C after {elapsed:.0f} s; every finished trial is kept in the study"
        )
        return EXIT_INTERRUPTED
    asked = counts.trained + counts.rejected + counts.failed + counts.stopped_early
    summary = (
        f"{counts.trained} trials trained in {elapsed:.0f} s; {counts.rejected} of {asked} "
        f"sampled configs ({counts.rejected / max(1, asked):.0%}) over budget by estimate and "
        "never trained"
    )
    if counts.fitted:
        summary += f" ({counts.fitted} shrunk copies of them queued to fit the budgets)"
    if counts.stopped_early:
        summary += (
            f"; {counts.stopped_early} stopped early, saving {counts.epochs_saved} of "
            f"{counts.epochs_trained + counts.epochs_saved} epochs"
        )
    summary += (
        f"; {counts.infeasible_after_training} over budget as measured, {counts.failed} failed"
    )
    if counts.stopped_reason:
        summary += f"; stopped: {counts.stopped_reason}"
    console.print(summary)
    print_paths(console, url, folder, written)
    return 1 if failed_workers else 0


def start_workers(
    args: argparse.Namespace, workers: int, finish_at: int, device: str, folder: Path
) -> list[tuple[subprocess.Popen, Path]]:
    """Start workers 1..K-1 as processes running this same command on the same study.

    With several GPUs each worker gets its own; otherwise they share the device, and on
    CPU the cores are split between them (this process is worker 0).
    """
    import torch

    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    threads = max(1, (os.cpu_count() or 1) // workers)
    if gpus <= 1:
        torch.set_num_threads(threads)
    logs = folder / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    storage = args.storage or storage_url(None, folder)
    children = []
    for index in range(1, workers):
        command = [
            *LAUNCHER, *args.argv,
            "--workers", "1", "--worker-index", str(index), "--finish-at", str(finish_at),
            "--storage", storage, "--study", folder.name,
        ]  # fmt: skip
        if gpus > 1:
            command += ["--device", f"cuda:{index % gpus}"]
        else:
            command += ["--threads", str(threads)]
        log = logs / f"worker-{index}.log"
        with open(log, "w") as stream:
            children.append(
                (subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT), log)
            )
    return children


def wait_for_workers(children: list[tuple[subprocess.Popen, Path]], console: Console) -> int:
    """Wait for the other workers; say which failed and where their log is."""
    failed = 0
    for process, log in children:
        try:
            code = process.wait()
        except KeyboardInterrupt:  # a second Ctrl-C: they got the first one too
            code = process.wait()
        if code not in (0, EXIT_INTERRUPTED):
            failed += 1
            console.print(f"a worker exited with code {code}; its log: {log}")
    return failed


def requested_space(args: argparse.Namespace):
    """The space the user asked for, when the dataset's shape is known without loading it;
    None for datasets that must be read first."""
    from compsearch.objectives.catalog import SHAPES

    shape = SHAPES.get(args.dataset)
    if shape is None:
        if not args.dataset.startswith("folder:"):
            raise UsageError(f"unknown dataset {args.dataset!r}; available: {', '.join(SHAPES)}")
        return None
    return space_for_data(args, shape.channels, shape.num_classes, shape.resolution)


def space_for_data(args: argparse.Namespace, channels: int, num_classes: int, resolution: int):
    from compsearch.spaces.space import SpaceError, load_space, space_for

    space = space_for(channels, num_classes, resolution)
    if not args.space:
        return space
    try:
        return load_space(Path(args.space), space)
    except SpaceError as error:
        raise UsageError(f"{error}; see the README's 'Search space' section") from None


def check_reachable(space, budgets, console: Console) -> None:
    """Exit before any work when nothing in the space can meet the budgets, and say so
    when a budget is above everything the space holds (it then constrains nothing)."""
    from compsearch.spaces.budgets import amount
    from compsearch.spaces.estimate import extreme_estimate

    smallest = extreme_estimate(space, smallest=True)
    over = budgets.excess(smallest.params, smallest.size_kb, smallest.macs)
    if over:
        raise UsageError(
            "no model in the search space meets the budgets: the smallest reachable has "
            f"{smallest.params:,} params, {smallest.size_kb:.1f} KB, {smallest.macs:,} MACs "
            f"({'; '.join(over)}); raise the budgets, or widen the space to smaller models "
            "with --space (lower width, stem_width and depth, higher prune_fraction, int8 in "
            "precisions)"
        )
    largest = extreme_estimate(space, smallest=False)
    slack = [
        f"--{flag} {amount(limit)} is above the largest model the space holds "
        f"({amount(reached)}{unit})"
        for flag, limit, reached, unit in (
            ("budget-params", budgets.params, largest.params, " params"),
            ("budget-kb", budgets.size_kb, largest.size_kb, " KB"),
            ("budget-macs", budgets.macs, largest.macs, " MACs"),
        )
        if limit is not None and limit >= reached
    ]
    if slack:
        console.print("note: " + "; ".join(slack) + ": it does not constrain this search")


def write_results(study, folder: Path, console: Console) -> list[Path]:
    from compsearch.results.table import front_table, pareto_front, trials_frame
    from compsearch.search.study import study_budgets

    written = write_study_files(study, folder)
    budgets = study_budgets(study)
    front = pareto_front(trials_frame(study, budgets))
    if len(front):
        title = f"{study.study_name} ({budgets.describe()})"
        console.print(front_table(front, f"Feasible Pareto front of {title}"))
    else:
        console.print("no feasible trial yet")
    return written


def write_study_files(study, folder: Path) -> list[Path]:
    """trials.csv, the figures and report.html: what `run`, `plot` and `export` leave."""
    from compsearch.results.plots import (
        write_history_png,
        write_html,
        write_importance_png,
        write_png,
    )
    from compsearch.results.report import write_report
    from compsearch.results.table import accuracy_importance, search_history, trials_frame
    from compsearch.search.study import study_budgets

    budgets = study_budgets(study)
    frame = trials_frame(study, budgets)
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / "trials.csv"
    frame.to_csv(csv, index=False)
    title = f"{study.study_name} ({budgets.describe()})"
    written = [
        csv,
        write_png(frame, budgets, folder / "pareto.png", title),
        write_html(frame, budgets, folder / "pareto.html", title),
        write_history_png(search_history(frame, budgets), frame, folder / "history.png", title),
    ]
    importance = write_importance_png(
        accuracy_importance(study), int(frame["trained"].sum()), folder / "importance.png", title
    )
    if importance is not None:
        written.append(importance)
    settings = study.user_attrs[SETTINGS_KEY]
    written.append(write_report(frame, budgets, settings, folder, study.study_name))
    return written


def print_paths(console: Console, url: str, folder: Path, written: list[Path]) -> None:
    console.print("written:")
    if url.startswith("sqlite:///"):
        console.print(f"  {url.removeprefix('sqlite:///')}  (the Optuna study)")
    else:
        console.print(f"  {redact(url)}  (the Optuna study)")
    for path in [*written, folder / SPACE_FILE, folder / "trials"]:
        if path.exists():
            console.print(f"  {path}")


def locate(args: argparse.Namespace, console: Console):
    """The study that show/plot mean: --study, else the only or newest one under --out."""
    from compsearch.search.study import load_existing_study, open_storage

    if args.study:
        check_study_name(args.study)
    check_folder(args.out, "--out")
    if args.storage:
        check_storage(args.storage)
        study = load_existing_study(open_storage(args.storage), args.study)
        check_study_name(study.study_name, where="the storage's study")
        return study, args.out / study.study_name
    if args.study:
        folder = args.out / args.study
        if not (folder / "study.db").exists():
            raise UsageError(f"no study {args.study!r} under {args.out}; check --out and --study")
    else:
        found = sorted(args.out.glob("*/study.db"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UsageError(f"no study under {args.out}; run 'compsearch run' first or set --out")
        folder = found[-1].parent
        if len(found) > 1:
            console.print(f"{len(found)} studies under {args.out}; using the newest, {folder.name}")
    study = load_existing_study(open_storage(storage_url(None, folder)), folder.name)
    if SETTINGS_KEY not in study.user_attrs:
        raise UsageError(f"study {study.study_name!r} was not created by compsearch")
    return study, folder


def command_show(args: argparse.Namespace, console: Console) -> int:
    from compsearch.results.table import (
        all_trials_table,
        front_table,
        pareto_front,
        study_counts,
        trials_frame,
    )
    from compsearch.search.study import study_budgets

    study, _ = locate(args, console)
    budgets = study_budgets(study)
    frame = trials_frame(study, budgets)
    title = f"{study.study_name} ({budgets.describe()})"
    console.print(study_counts(frame))
    if args.all:
        console.print(all_trials_table(frame, f"All trials of {title}"))
        return 0
    front = pareto_front(frame)
    if front.empty:
        console.print(f"{title}: no feasible trial yet ({len(frame)} trials)")
        return 0
    console.print(front_table(front, f"Feasible Pareto front of {title}"))
    return 0


def command_plot(args: argparse.Namespace, console: Console) -> int:
    study, folder = locate(args, console)
    for path in write_study_files(study, folder):
        console.print(f"written: {path}")
    return 0


def command_export(args: argparse.Namespace, console: Console) -> int:
    if args.trial != "best" and not re.fullmatch(r"[0-9]+", args.trial.strip()):
        raise UsageError(f"--trial must be best or a trial number, but got {args.trial!r}")
    epochs = parse_count(args.epochs, "--epochs") if args.epochs else None
    if epochs is not None and epochs < 2:
        raise UsageError(f"--epochs must be at least 2 (train, then fine-tune), but got {epochs}")
    if args.teacher not in (None, "none", "auto"):
        check_model_file(args.teacher, "--teacher")
    if args.data_dir is not None:
        check_folder(args.data_dir, "--data-dir")
    check_device_name(args.device)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from compsearch.results.export import ExportError, choose_trial, export_trial
    from compsearch.search.study import study_budgets

    study, folder = locate(args, console)

    def frame():
        from compsearch.results.table import trials_frame

        return trials_frame(study, study_budgets(study))

    try:
        trial = choose_trial(study, frame, args.trial.strip())
    except ExportError as error:
        raise UsageError(str(error)) from None
    settings = study.user_attrs[SETTINGS_KEY]
    name, stored_dir = settings.get("data_source") or [settings["dataset"], "data"]
    data_dir = args.data_dir or Path(stored_dir)
    if args.data_dir and name.startswith("folder:"):
        name = f"folder:{args.data_dir}"
    device = resolve_device(args.device)
    folder.mkdir(parents=True, exist_ok=True)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from compsearch.objectives.data import DataError

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("epochs", total=None)

            def on_epoch(done: int, total: int, resolution: int) -> None:
                progress.update(
                    task, completed=done, total=total, description=f"epochs at {resolution} px"
                )

            exported = export_trial(
                study,
                trial,
                folder,
                epochs,
                args.teacher,
                device,
                (name, data_dir),
                args.out,
                say=console.print,
                on_epoch=on_epoch,
                on_step=Reporter(args.report_fd).step,
            )
    except (ExportError, DataError) as error:
        raise UsageError(str(error)) from None
    card = exported.card
    console.print(
        f"trial {card['trial']} exported: test accuracy {card['test_accuracy']:.2%}, "
        f"validation {card['validation_accuracy']:.2%} (onnxruntime, on model.onnx); "
        f"{card['params']:,} params, {card['size_kb']:.1f} KB, {card['precision']}, "
        f"within {study_budgets(study).describe()}"
    )
    for file in ("model.onnx", "model.pt", "model.json"):
        console.print(f"  {exported.folder / file}")
    # The report shows the export's verified figures from now on.
    console.print(f"  {write_study_files(study, folder)[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(entry())
