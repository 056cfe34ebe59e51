"""The jobs, once their input is checked (search/prepare.py): a run (open the study, start
the other workers, prepare the teacher, search, write the results) and an export (retrain
a trial for longer, verify its file against the budgets, write the model and its card).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import socket
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from compsearch import __version__
from compsearch.objectives.catalog import CACHE_FOLDER
from compsearch.objectives.compress import FlipAveraged
from compsearch.objectives.data import Dataset, load_dataset
from compsearch.objectives.measure import calibration_images, file_size_kb, onnx_accuracy
from compsearch.objectives.teacher import prepare_teacher
from compsearch.objectives.train import (
    DeviceData,
    Distillation,
    EpochCallback,
    accuracy,
    export_recipe,
    predict,
)
from compsearch.objectives.trial import (
    CALIBRATION_IMAGES,
    Candidate,
    StepCallback,
    TrialResult,
    best_candidate,
    compression_candidates,
    lost_too_much,
    train_model,
)
from compsearch.results.export import ExportError, model_card, sha256, write_export
from compsearch.results.files import write_study_files
from compsearch.results.records import StudySettings, TrialRecord
from compsearch.search.anchors import queue_anchors
from compsearch.search.common import (
    EXIT_INTERRUPTED,
    EXPORT_EPOCH_FACTOR,
    SPACE_FILE,
    WORKER_SEED_STRIDE,
    UsageError,
    redact,
)
from compsearch.search.cost import TimeLimit
from compsearch.search.loop import (
    SearchSettings,
    default_schedule,
    fail_stale_trials,
    finished_and_running,
    over_after_pruning,
    search,
    waiting_trials,
)
from compsearch.search.options import WorkerRole
from compsearch.search.prepare import PreparedExport, PreparedRun
from compsearch.search.study import existing_trials, make_sampler, open_storage, open_study
from compsearch.search.summaries import ExportSummary, RunSummary
from compsearch.search.supervise import Reporter
from compsearch.search.views import view_of
from compsearch.spaces.budgets import Budgets, amount
from compsearch.spaces.config import TrainConfig, TrialConfig
from compsearch.spaces.space import sample


def execute_run(
    prepared: PreparedRun, console: Console, role: WorkerRole, reporter: Reporter
) -> RunSummary:
    """Open (or create) the study, start the other workers, prepare the teacher, search
    until the study holds its target of finished trials, then write trials.csv, the
    figures and the report (worker 0 only, once all workers have finished)."""
    options, data, space = prepared.options, prepared.data, prepared.space
    name, folder, url = options.study_name, options.folder, options.storage_url
    # --time counts from here: the teacher and the cost model's calibration are in it.
    time_limit = TimeLimit.after(options.time) if options.time is not None else None
    device = resolve_device(options.device)
    if role.threads:
        torch.set_num_threads(role.threads)
    schedule = default_schedule(options.epochs, data.resolution)
    on_device = DeviceData(data, device)
    # A teacher file is checked before the storage opens; one to train, after.
    distillation = None
    if options.teacher != "auto":
        distillation = teacher(prepared, on_device, schedule, console, reporter)
    storage = open_storage(url, options.heartbeat)  # only now: bad data leaves no empty study
    settings = StudySettings(
        dataset=data.name,
        budgets=options.budgets,
        seed=options.seed,
        subset=options.subset,
        teacher=options.teacher,
        data_source=options.data_source(),
        space=space,
        version=__version__,
        objectives=options.objectives,
        file_format=options.format,
    )
    # A resumed study gets a fresh sampler seed so it does not repeat its first proposals,
    # and workers started together get different ones.
    sampler_seed = options.seed + existing_trials(storage, name) + WORKER_SEED_STRIDE * role.index
    if options.storage and role.index == 0:
        # Possibly one of several workers started by hand on a shared storage: without its
        # own salt it would propose the same first configs as the others.
        sampler_seed += zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 100_000
    study = open_study(storage, name, settings, make_sampler(options.sampler, sampler_seed))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPACE_FILE).write_text(space.to_toml())
    fail_stale_trials(study)
    waiting = waiting_trials(study)  # interrupted or lost trials, before any anchor is queued
    before = len(study.trials)
    if options.anchors and before == 0 and role.index == 0:
        queue_anchors(study, space, schedule, options.budgets, console.print, options.format)
    finish_at = role.finish_at
    if finish_at is None:
        finish_at = finished_and_running(study)[0] + options.trials
    reporter.send(study=name, storage=url, finish_at=finish_at)
    children = start_workers(prepared, role, finish_at, device) if options.workers > 1 else []
    console.print(
        f"study [bold]{name}[/] in {redact(url)}: {before} trials so far"
        + (f", {waiting} interrupted or lost trial(s) queued to run again" if waiting else "")
        + (f"; {len(children) + 1} workers, logs of the others in {folder / 'workers'}"
           if children else "")
        + f"; dataset {data.name} ({len(data.train)} train, {len(data.val)} validation images,"
        f" {data.resolution}x{data.resolution}x{data.channels}); device {device}"
    )  # fmt: skip
    run_settings = SearchSettings(
        options.budgets, options.trials, time_limit, options.seed, device, folder,
        finish_at=finish_at, rungs=options.rungs, fidelity=options.fidelity,
        file_format=options.format,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        if options.teacher == "auto":
            distillation = teacher(prepared, on_device, schedule, console, reporter)
        counts = search(
            study, space, schedule, data, run_settings, console, distillation, on_device,
            reporter,
        )  # fmt: skip
    except KeyboardInterrupt:
        counts = None
        for process, _ in children:  # they are in this process's group, not the terminal's
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
    finally:
        failed_workers = wait_for_workers(children, console)
    seconds = time.perf_counter() - started
    if role.index > 0:  # worker 0 writes the results once all have finished
        return RunSummary(name, redact(url), folder, seconds, counts, None, (), failed_workers)
    written = tuple(write_study_files(study, folder))
    view = view_of(study, folder)
    return RunSummary(name, redact(url), folder, seconds, counts, view, written, failed_workers)


def teacher(
    prepared: PreparedRun,
    on_device: DeviceData,
    schedule: TrainConfig,
    console: Console,
    reporter: Reporter,
) -> Distillation | None:
    """The run's distillation, with the teacher's epochs shown while one is trained."""
    options, data = prepared.options, prepared.data
    reporter.send(step=f"preparing the teacher ({options.teacher})")
    with epoch_progress(console, "teacher epochs") as on_epoch:
        return prepare_teacher(
            options.teacher, data, on_device, options.out, schedule, options.seed,
            options.subset, options.distill_weight, options.distill_temperature,
            say=console.print, on_epoch=on_epoch,
        )  # fmt: skip


@contextlib.contextmanager
def epoch_progress(console: Console, description: str) -> Iterator[EpochCallback]:
    """A transient progress bar of epochs; the context gives its on_epoch callback."""
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=None)

        def on_epoch(done: int, total: int, resolution: int) -> None:
            progress.update(
                task, completed=done, total=total, description=f"{description} at {resolution} px"
            )

        yield on_epoch


def resolve_device(name: str) -> str:
    """auto, cpu, cuda or cuda:K (checked by RunOptions) as a device this machine has."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but no CUDA GPU is available; use cpu")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise UsageError(
            f"--device {name}: only {torch.cuda.device_count()} CUDA devices are present"
        )
    return name


def start_workers(
    prepared: PreparedRun, role: WorkerRole, finish_at: int, device: str
) -> list[tuple[subprocess.Popen, Path]]:
    """Start workers 1..K-1 as processes running this same search on the same study.

    With several GPUs each worker gets its own; otherwise they share the device, and on
    CPU the cores are split between them (this process is worker 0).
    """
    options = prepared.options
    workers = options.workers
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    threads = max(1, (os.cpu_count() or 1) // workers)
    if gpus <= 1:
        torch.set_num_threads(threads)
    logs = options.folder / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    one = dataclasses.replace(
        options, workers=1, storage=options.storage_url, study=options.study_name
    )
    children = []
    for index in range(1, workers):
        command = [
            *role.launcher, "run", *one.to_argv(),
            "--worker-index", str(index), "--finish-at", str(finish_at),
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


def execute_export(prepared: PreparedExport, console: Console, reporter: Reporter) -> ExportSummary:
    """Retrain the trial's config for `--epochs` (default EXPORT_EPOCH_FACTOR times the
    trial's) on the whole training split, compress it as the trial did, and write
    `export/` only when the file meets every budget (ExportError otherwise, with the
    figures, and nothing written)."""
    options, record, settings = prepared.options, prepared.record, prepared.settings
    budgets, seed = settings.budgets, settings.seed
    device = resolve_device(options.device)
    begun = time.perf_counter()
    trial_epochs = record.config.train.epochs
    epochs = options.epochs or EXPORT_EPOCH_FACTOR * trial_epochs
    data = load_dataset(
        prepared.dataset, seed=seed, data_dir=prepared.data_dir,
        cache_folder=options.out / CACHE_FOLDER,
    )  # fmt: skip
    if options.flip and not data.flip:
        raise UsageError(
            f"--flip averages the model's outputs on each image and its mirror, but a "
            f"mirrored {data.name} image may be another class (it trains unflipped); "
            "export without --flip"
        )
    sized = ""
    seconds_left = None
    if options.time is not None:
        deadline = begun + options.time

        def seconds_left() -> float:
            return deadline - time.perf_counter()

        epochs = epochs_for_time(
            record, settings.subset, len(data.train), options.time,
            quantization_aware="int8" in settings.space.precisions
            and lost_to_post_training(record),
        )  # fmt: skip
        sized = (
            f", sized to --time {options.time:g} s from the trial's "
            f"{trial_training_seconds(record):.0f} s of training"
        )
    schedule = default_schedule(epochs, data.resolution)
    try:  # the config as sampled, before pruning, with the export's schedule
        config = sample(optuna.trial.FixedTrial(record.searched), settings.space, schedule)
    except ValueError as error:
        raise ExportError(f"trial {record.number}'s parameters no longer fit: {error}") from None
    on_device = DeviceData(data, device)
    teacher_spec = options.teacher or settings.teacher

    def step(text: str) -> None:
        reporter.step(record.number, text)

    folder = prepared.folder
    folder.mkdir(parents=True, exist_ok=True)
    with epoch_progress(console, "epochs") as on_epoch:
        step(f"preparing the teacher ({teacher_spec})")
        distillation = prepare_teacher(
            teacher_spec, data, on_device, options.out, schedule, seed, None,
            say=console.print, on_epoch=on_epoch,
        )  # fmt: skip
        console.print(
            f"exporting trial {record.number}: {trained_epochs(config)} on "
            f"{len(data.train)} training images (the trial had "
            f"{trained_epochs(record.config)}{sized}), teacher {teacher_spec}"
            + (", flip-averaged file (twice the MACs)" if options.flip else "")
        )
        with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as work:
            work = Path(work)
            started = time.perf_counter()
            file_format = prepared.file_format
            precisions = ("int8",) if file_format == "tflite" else settings.space.precisions

            def check_pruned(pruned: TrialConfig) -> None:
                # Global pruning may cut elsewhere than in the trial: stop before the
                # fine-tune when no precision the space allows fits the budgets.
                reasons = [
                    over_after_pruning(at_precision(pruned, precision), budgets, file_format)
                    for precision in precisions
                ]
                if all(reasons):
                    raise ExportError(
                        f"no file of trial {record.number}'s retrained model can meet "
                        f"{budgets.describe()}: {reasons[0]}; nothing was written. Export "
                        "another trial (compsearch show) or a smaller one"
                    )

            model, deployed = train_model(
                config, on_device, seed, on_epoch, distillation=distillation, on_step=step,
                recipe=export_recipe(config.train.epochs), after_pruning=check_pruned,
            )  # fmt: skip
            trained_in = time.perf_counter() - started
            step("measuring the trained model")
            resolution = deployed.train.test_resolution
            accuracy_torch = accuracy(
                predict(model, on_device.val, on_device, resolution), on_device.val.labels
            )
            candidates = compression_candidates(
                model, deployed, data, on_device, work, seed, settings.space.precisions,
                budgets, step, seconds_left=seconds_left,
                quantization_aware_seconds=QUANTIZATION_AWARE_SHARE * trained_in,
                flip=options.flip,
            )  # fmt: skip
            chosen = best_candidate(candidates, budgets)
            if chosen is None:
                raise ExportError(no_candidate_fits(record.number, candidates, budgets))
            result = chosen_result(
                deployed, chosen, candidates, accuracy_torch, work / "model.onnx",
                time.perf_counter() - started,
            )  # fmt: skip
            test_accuracy = onnx_accuracy(result.onnx_path, data.test, data, data.resolution)
            card = model_card(
                prepared.study.study_name, record, result, data, budgets, seed, epochs,
                teacher_spec, test_accuracy, candidate_rows(candidates, chosen, budgets),
                flip=options.flip,
            )  # fmt: skip
            if prepared.file_format == "tflite":
                write_tflite_files(
                    card, model, candidates, chosen, data, budgets, resolution, seed,
                    options.flip, work, step,
                )  # fmt: skip
            target = write_export(folder, work, result, card)
    # The report shows the export's verified figures from now on.
    report = write_study_files(prepared.study, folder)[-1]
    return ExportSummary(target, card, budgets, report)


def at_precision(config: TrialConfig, precision: str) -> TrialConfig:
    return dataclasses.replace(
        config, compress=dataclasses.replace(config.compress, precision=precision)
    )


def trained_epochs(config: TrialConfig) -> str:
    """'12 epochs', or '12 epochs (15 trained: pruning stretches the fine-tune)'."""
    text = f"{config.train.epochs} epochs"
    if config.epochs != config.train.epochs:
        text += f" ({config.epochs} trained: pruning stretches the fine-tune)"
    return text


# The export's training gets this share of --time; the rest is for writing and measuring
# its candidate files and the test split.
TRAINING_SHARE_OF_TIME = 0.9
# An int8 candidate adds a quantization-aware fine-tune: a sixteenth of the images the
# training saw, in fp32 with rounding (trial.QUANTIZATION_AWARE_IMAGE_SHARE), at most
# about a quarter of the training's seconds, counted as this share of them. Under
# --time it runs only if that many seconds are left (kept for it only when the trial's
# int8 file lost to post-training quantization, lost_to_post_training).
QUANTIZATION_AWARE_SHARE = 0.25


def epochs_for_time(
    record: TrialRecord,
    subset: int | None,
    train_images: int,
    seconds: float,
    quantization_aware: bool = False,
) -> int:
    """The schedule's epochs on `train_images` images that fit `seconds`, at the trial's
    own measured seconds per image and epoch (at least 2: train, then fine-tune), with the
    fine-tune stretched by pruning as the trial's was, leaving time for a
    quantization-aware fine-tune when `quantization_aware`. The trial trained on its
    rung's images; a trial from before fidelities, on `subset` images or all."""
    trial_images = min(subset, train_images) if subset else train_images
    if record.train_images:
        trial_images = record.train_images
    if not record.seconds > 0:
        raise ExportError(
            f"trial {record.number} has no measured training time to size --time from; "
            "give --epochs instead"
        )
    config = record.config
    per_image_epoch = trial_training_seconds(record) / (config.epochs * trial_images)
    trained = training_share(quantization_aware) * seconds / (per_image_epoch * train_images)
    # Pruning stretches the fine-tune (TrialConfig.epochs): the schedule's epochs are fewer.
    return max(2, int(trained * config.train.epochs / config.epochs))


def trial_training_seconds(record: TrialRecord) -> float:
    """The seconds the trial spent training, or its whole seconds where a study from before
    they were recorded has only those (they err long: writing and measuring the file)."""
    return record.train_seconds if record.train_seconds > 0 else record.seconds


def lost_to_post_training(record: TrialRecord) -> bool:
    """Whether the trial's int8 file lost more than QUANTIZATION_AWARE_THRESHOLD to
    post-training quantization: then an export's --time keeps room for the
    quantization-aware fine-tune. Otherwise that fine-tune runs only if time is left."""
    return lost_too_much(record.accuracy_before_compression, record.accuracy_post_training)


def training_share(quantization_aware: bool) -> float:
    """The share of an export's --time its training gets."""
    return TRAINING_SHARE_OF_TIME / (1 + QUANTIZATION_AWARE_SHARE * quantization_aware)


def no_candidate_fits(number: int, candidates: list[Candidate], budgets: Budgets) -> str:
    """The export's refusal when no file of the retrained model meets the budgets."""
    figures = "; ".join(
        f"{c.name}: {c.size_kb:.1f} KB, {c.params:,} params, {amount(c.macs)} MACs"
        + (f" ({c.note})" if c.note else "")
        for c in candidates
    )
    return (
        f"no file of trial {number}'s retrained model meets {budgets.describe()} ({figures}); "
        "nothing was written. Export another trial (compsearch show) or a smaller one"
    )


def chosen_result(
    config: TrialConfig,
    chosen: Candidate,
    candidates: list[Candidate],
    accuracy_torch: float,
    path: Path,
    seconds: float,
) -> TrialResult:
    """The export's result: the chosen candidate's file moved to `path`, its figures."""
    chosen.path.replace(path)
    post_training = next(
        (c.accuracy for c in candidates if c.name == "int8 post-training" and c.written),
        chosen.accuracy,
    )
    compress = dataclasses.replace(config.compress, precision=chosen.precision)
    return TrialResult(
        config=dataclasses.replace(config, compress=compress),
        accuracy=chosen.accuracy,
        accuracy_before_compression=accuracy_torch,
        accuracy_post_training=post_training if chosen.precision == "int8" else chosen.accuracy,
        quantization_aware=chosen.quantization_aware,
        params=chosen.params,
        macs=chosen.macs,
        size_kb=chosen.size_kb,
        ram_kb=chosen.ram_kb,
        latency_ms=chosen.latency_ms,
        onnx_path=path,
        # model.pt holds the network itself; the card says when the file flip-averages it.
        model=unwrapped(chosen.model).cpu().eval(),
        seconds=seconds,
        early_accuracy=math.nan,
    )


def write_tflite_files(
    card: dict[str, Any],
    model: torch.nn.Module,
    candidates: list[Candidate],
    chosen: Candidate,
    data: Dataset,
    budgets: Budgets,
    resolution: int,
    seed: int,
    flip: bool,
    work: Path,
    step: StepCallback,
) -> None:
    """`export --format tflite`: an int8 model.tflite of the trained model (calibrated
    after training) and, where it was written, of the quantization-aware copy; the more
    accurate in LiteRT on the validation split is kept, checked against the budgets with
    its own bytes, peak memory and latency, and written beside model.onnx with its C
    array; `card` gets its figures under "tflite"."""
    from compsearch.objectives import tflite  # litert-torch, only here

    calibration = calibration_images(data, resolution, CALIBRATION_IMAGES, seed)
    sources = {"post-training": FlipAveraged(model) if flip else model}
    for candidate in candidates:
        if candidate.quantization_aware and candidate.written:
            sources["quantization-aware"] = candidate.model
    files = {}
    for name, source in sources.items():
        step(f"writing the int8 .tflite file ({name})")
        written = tflite.write_tflite(source, calibration, work / f"model-{name}.tflite")
        files[name] = (tflite.tflite_accuracy(written.path, data.val, data, resolution), written)
    name = max(files, key=lambda key: files[key][0])
    accuracy, written = files[name]
    path = written.path.replace(work / "model.tflite")
    step("measuring model.tflite")
    size_kb, ram_kb = file_size_kb(path), tflite.tflite_ram_kb(path)
    latency_ms = tflite.tflite_latency_ms(path)
    over = budgets.excess(chosen.params, size_kb, chosen.macs, ram_kb, latency_ms)
    if over:
        raise ExportError(
            f"the int8 .tflite file breaks the budgets ({', '.join(over)}); nothing was "
            "written. Export with --format onnx, or another trial (compsearch show)"
        )
    tflite.c_array(path, work / "model_data.cc", work / "model_data.h")
    card["tflite"] = {
        "source": name,  # the model it was converted from
        "validation_accuracy": accuracy,
        "test_accuracy": tflite.tflite_accuracy(path, data.test, data, data.resolution),
        # validation accuracy of each file converted, by the model it came from
        "candidates": {key: value[0] for key, value in files.items()},
        "size_kb": size_kb,
        "ram_kb": ram_kb,  # peak activation memory of one inference (objectives/tflite.py)
        "latency_ms": latency_ms,  # median single-image latency in LiteRT, one thread
        "sha256": sha256(path),
        "input": {
            "dtype": "int8",
            "layout": "NCHW",
            "shape": [1, data.channels, data.resolution, data.resolution],
            "scale": written.input.scale,
            "zero_point": written.input.zero_point,
            "steps": "the preprocessing below, then round(x / scale) + zero_point, "
            "clipped to -128..127",
        },
        "output": {
            "dtype": "int8",
            "scale": written.output.scale,
            "zero_point": written.output.zero_point,
            "steps": "logits = scale * (output - zero_point); the argmax of the int8 "
            "output is the class",
        },
    }
    card["files"].update(
        {
            "model.tflite": "int8 for LiteRT and TensorFlow Lite Micro, weights per "
            "output channel, activations calibrated on training images (ai-edge-quantizer); "
            "its figures are under tflite",
            "model_data.cc": f"model.tflite as a C array ({tflite.ARRAY_NAME}, "
            f"{tflite.ARRAY_NAME}_len), aligned to 16 bytes",
            "model_data.h": "its declaration",
        }
    )
    card["packages"].update(tflite.package_versions())


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.model if isinstance(model, FlipAveraged) else model


def candidate_rows(
    candidates: list[Candidate], chosen: Candidate, budgets: Budgets
) -> list[dict[str, Any]]:
    """Every candidate's figures, for the card."""
    return [
        {
            "name": c.name,
            "precision": c.precision,
            "quantization_aware": c.quantization_aware,
            "validation_accuracy": c.accuracy if c.written else None,
            "size_kb": round(c.size_kb, 3),
            "params": c.params,
            "macs": c.macs,
            "ram_kb": round(c.ram_kb, 3),
            "latency_ms": round(c.latency_ms, 4) if c.written else None,
            "written": c.written,
            "within_budgets": not c.excess(budgets),
            "chosen": c is chosen,
            "note": c.note,
        }
        for c in candidates
    ]
