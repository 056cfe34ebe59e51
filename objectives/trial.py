"""One trial, top to bottom: build, train low-res, prune, fine-tune at test res, export,
measure. The result's figures all come from the deployed file (ONNX, or .tflite under
`run --format tflite`) or the pruned model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from compsearch.objectives.compress import FlipAveraged, export, prune
from compsearch.objectives.data import Dataset, Split
from compsearch.objectives.latency import file_latency_ms
from compsearch.objectives.measure import (
    calibration_images,
    count_macs,
    count_params,
    file_size_kb,
    onnx_accuracy,
)
from compsearch.objectives.memory import file_ram_kb
from compsearch.objectives.quantize import quantization_aware_finetune
from compsearch.objectives.train import (
    DeviceData,
    Distillation,
    EpochCallback,
    Phase,
    Recipe,
    TrainingDiverged,
    accuracy,
    fit,
    predict,
    recalibrate_batchnorm,
    spread_sample,
    whiten_stem,
    zero_init_residual,
)
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.builder import build
from compsearch.spaces.config import TrainConfig, TrialConfig
from compsearch.spaces.estimate import check_tflite_precision, estimate

EarlyCheck = Callable[[float], str | None]  # validation accuracy -> why to stop, or None
# Told the step a trial is starting ("pruning"), so that a crash can say where it came.
StepCallback = Callable[[str], None]


def no_step(step: str) -> None:
    pass


CALIBRATION_IMAGES = 256  # training images that calibrate int8 activation ranges
FINETUNE_LEARNING_RATE_FACTOR = 0.2  # fine-tune peak learning rate / training peak
TAYLOR_IMAGES = 512  # training images whose loss gradients rank channels for Taylor pruning
# Validation accuracy (a fraction) that post-training int8 may lose against the fp32
# model before a quantization-aware fine-tune is tried.
QUANTIZATION_AWARE_THRESHOLD = 0.003
# Its learning rate against the fine-tune's: the weights only need to move to the grid.
# 0.02 (a two-hundred-and-fiftieth of the training's peak): at 0.5 it lowered six of seven
# CIFAR-10 networks trained to 82-85% (by 0.18 to 0.47 points) and diverged on a ResNet-8
# (batch-norm scales up to 10 make folded weights move up to a hundred times faster than
# the rate says); at 0.02 each of four such networks ended 0.03 to 0.26 points above its
# fp32 model, at 0.1 three of four (bench/results/quantization_aware_rate.md).
QUANTIZATION_AWARE_LEARNING_RATE_FACTOR = 0.02
# Its length: this share of the images the schedule trains on (its epochs x training
# images, before pruning stretches the fine-tune), in whole epochs over a fixed draw of
# the training images. It runs in fp32 with rounding
# at the test resolution, so an image costs it more than it costs the training: 1.4
# times on a CPU that trains in fp32 (ResNet-8, AVX2), 1.4 to 3.8 times on one that
# trains in bf16 (five networks, bench/results/compression_fidelity_cifar10.md), where
# a sixteenth took 0.09 to 0.24 of the training's seconds.
QUANTIZATION_AWARE_IMAGE_SHARE = 1 / 16


@dataclass(frozen=True)
class TrialResult:
    config: TrialConfig  # as deployed: widths after pruning
    accuracy: float  # validation top-1 of the ONNX file in onnxruntime
    accuracy_before_compression: float  # validation top-1 of the torch fp32 model
    # Validation top-1 of the file as first exported: for int8, post-training quantization.
    accuracy_post_training: float
    # Whether the file comes from a quantization-aware fine-tune, tried when post-training
    # int8 lost more than QUANTIZATION_AWARE_THRESHOLD and kept when it measured better.
    quantization_aware: bool
    params: int
    macs: int
    size_kb: float  # ONNX file bytes / 1000
    onnx_path: Path
    model: torch.nn.Module  # what the file holds, on the CPU in eval mode
    seconds: float  # the whole trial: training, compressing, writing and measuring
    # Validation top-1 (torch, at the training resolution) after the first
    # `check_epoch(...)` epochs: what early stopping judges a trial by.
    early_accuracy: float
    # Of `seconds`, those of training alone (both phases, pruning, batch-norm
    # recalibration): what an export's --time scales, without the fixed costs around it.
    train_seconds: float = math.nan
    # Peak activation memory of one inference of the file / 1000 (objectives/memory.py).
    ram_kb: float = math.nan
    # Median single-image milliseconds of the file in onnxruntime (LiteRT for a .tflite
    # file), one thread, on this machine (objectives/latency.py, objectives/tflite.py).
    latency_ms: float = math.nan
    # Under `run --format tflite`: the int8 .tflite file the figures above measure, and
    # the validation top-1 of the ONNX int8 file it was made beside; None and NaN else.
    tflite_path: Path | None = None
    onnx_accuracy: float = math.nan
    tflite_seconds: float = math.nan  # of `seconds`, those writing and measuring it


class StoppedEarly(Exception):
    """An early check found the trial cannot reach the Pareto front; says why."""

    def __init__(self, reason: str, early_accuracy: float, epochs_done: int) -> None:
        super().__init__(reason)
        self.early_accuracy = early_accuracy
        self.epochs_done = epochs_done


def check_epoch(train: TrainConfig) -> int:
    """The epoch after which a trial's accuracy is checked: a third of the low-resolution
    phase, at least one epoch."""
    return max(1, (train.epochs - train.finetune_epochs) // 3)


def train_model(
    config: TrialConfig,
    on_device: DeviceData,
    seed: int,
    on_epoch: EpochCallback | None = None,
    after_low_resolution: Callable[[torch.nn.Module, int], None] | None = None,
    distillation: Distillation | None = None,
    on_step: StepCallback = no_step,
    recipe: Recipe | None = None,
    after_pruning: Callable[[TrialConfig], None] | None = None,
) -> tuple[torch.nn.Module, TrialConfig]:
    """Build and train one config, FixRes: the low-resolution phase, pruning, the
    fine-tune at the test resolution, batch-norm recalibration. Returns the trained model
    (on the training device, eval mode) and the config with the widths pruning left.

    `after_low_resolution(model, epoch)` is called after each low-resolution epoch;
    `after_pruning(config)` with the widths pruning left, before the fine-tune (it may
    raise to stop there: global pruning's widths are known only then).
    """
    train = config.train
    recipe = recipe or Recipe()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build(config.arch).to(on_device.device).to(memory_format=torch.channels_last)
    if recipe.zero_init_residual:
        zero_init_residual(model)
    if recipe.whiten_stem:
        whiten_stem(model, on_device, train.train_resolution)
    low_resolution = Phase.of(
        train, train.train_resolution, train.epochs - train.finetune_epochs, recipe
    )

    def low_epoch(epoch: int, epochs: int, resolution: int) -> None:
        if on_epoch is not None:
            on_epoch(epoch, epochs, resolution)
        if after_low_resolution is not None:
            after_low_resolution(model, epoch)

    on_step(f"training at {train.train_resolution} px")
    fit(model, on_device, low_resolution, generator, low_epoch, distillation)

    on_step("pruning")
    example = torch.zeros(1, on_device.channels, train.test_resolution, train.test_resolution)
    loss = taylor_loss(on_device, train.test_resolution)
    arch = prune(model, config.arch, config.compress, example.to(on_device.device), loss)
    config = dataclasses.replace(config, arch=arch)
    if after_pruning is not None and config.compress.prune_fraction > 0:
        after_pruning(config)
    on_step(f"fine-tuning at {train.test_resolution} px")
    phase = finetune_phase(train, recipe=recipe, epochs=config.finetune_epochs)
    fit(model, on_device, phase, generator, on_epoch, distillation)
    on_step("recalibrating batch norms")
    recalibrate_batchnorm(model, on_device, train.test_resolution, train.batch_size)
    return model, config


def taylor_loss(
    on_device: DeviceData, resolution: int
) -> Callable[[torch.nn.Module], torch.Tensor]:
    """Cross-entropy on TAYLOR_IMAGES training images (a fixed random sample) at
    `resolution`: what Taylor pruning takes gradients of."""

    def loss(model: torch.nn.Module) -> torch.Tensor:
        index = spread_sample(TAYLOR_IMAGES, len(on_device.train)).to(on_device.device)
        images = on_device.train.images[index]
        labels = on_device.train.labels[index]
        model.eval()  # batch-norm statistics as they will be used
        return F.cross_entropy(model(on_device.inputs(images, resolution)), labels)

    return loss


def finetune_phase(
    train: TrainConfig,
    learning_rate_factor: float = 1.0,
    recipe: Recipe | None = None,
    epochs: int | None = None,
) -> Phase:
    """The fine-tune at the test resolution after pruning (FixRes), no warm-up, for
    `epochs` (the schedule's fine-tune epochs when None; `TrialConfig.finetune_epochs`
    after pruning); its learning rate scaled by `learning_rate_factor`."""
    factor = FINETUNE_LEARNING_RATE_FACTOR * learning_rate_factor
    epochs = train.finetune_epochs if epochs is None else epochs
    return dataclasses.replace(
        Phase.of(train, train.test_resolution, epochs, recipe),
        peak_learning_rate=train.learning_rate * factor,
        warmup_fraction=0.0,
    )


def run_trial(
    config: TrialConfig,
    data: Dataset,
    folder: Path,
    seed: int,
    on_device: DeviceData | None = None,
    on_epoch: EpochCallback | None = None,
    early_check: EarlyCheck | None = None,
    distillation: Distillation | None = None,
    on_step: StepCallback = no_step,
    file_format: str = "onnx",
    pruned_check: Callable[[TrialConfig], str | None] | None = None,
) -> TrialResult:
    """Train, compress and measure one config.

    `on_device` holds the data on the training device (made once per run; the CPU when
    None). After `check_epoch` epochs the validation accuracy is measured and recorded;
    when `early_check` gives a reason to stop, StoppedEarly is raised with it. With
    `file_format` "tflite" (an int8 config), the model the ONNX file holds (the
    quantization-aware copy where that was kept) is written as an int8 .tflite file too,
    and the result's accuracy, size, memory and latency are that file's, in LiteRT.
    When `pruned_check` gives a reason for the widths pruning left (a budget they break),
    StoppedEarly is raised with it before the fine-tune.
    """
    if file_format == "tflite":
        check_tflite_precision(config.compress.precision)
    started = time.perf_counter()
    train = config.train
    on_device = on_device or DeviceData(data, "cpu")
    early_accuracy = math.nan

    def check(model: torch.nn.Module, epoch: int) -> None:
        nonlocal early_accuracy
        if epoch != check_epoch(train):
            return
        early_accuracy = accuracy(
            predict(model, on_device.val, on_device, train.train_resolution),
            on_device.val.labels,
        )
        model.train()
        reason = early_check(early_accuracy) if early_check is not None else None
        if reason:
            raise StoppedEarly(reason, early_accuracy, epoch)

    def check_pruned(pruned: TrialConfig) -> None:
        reason = pruned_check(pruned) if pruned_check is not None else None
        if reason:
            raise StoppedEarly(reason, early_accuracy, train.epochs - train.finetune_epochs)

    model, config = train_model(
        config, on_device, seed, on_epoch, check, distillation, on_step,
        after_pruning=check_pruned,
    )  # fmt: skip
    train_seconds = time.perf_counter() - started
    on_step("measuring the trained model")
    accuracy_torch = accuracy(
        predict(model, on_device.val, on_device, train.test_resolution), on_device.val.labels
    )
    deployed = deploy(
        model, config, data, on_device, folder / "model.onnx", data.val, seed, accuracy_torch,
        on_step,
    )  # fmt: skip
    model = deployed.model.cpu().eval()
    if file_format == "tflite":
        measured = write_tflite_trial(model, data, folder / "model.tflite", train, seed, on_step)
    else:
        measured = measure_onnx(deployed.path, data, train.test_resolution)
    return TrialResult(
        config=config,
        accuracy=measured.accuracy if file_format == "tflite" else deployed.accuracy,
        accuracy_before_compression=accuracy_torch,
        accuracy_post_training=deployed.accuracy_post_training,
        quantization_aware=deployed.quantization_aware,
        params=count_params(model),
        macs=count_macs(model, data.channels, train.test_resolution),
        size_kb=measured.size_kb,
        onnx_path=deployed.path,
        model=model,
        seconds=time.perf_counter() - started,
        early_accuracy=early_accuracy,
        train_seconds=train_seconds,
        ram_kb=measured.ram_kb,
        latency_ms=measured.latency_ms,
        tflite_path=measured.path if file_format == "tflite" else None,
        onnx_accuracy=deployed.accuracy if file_format == "tflite" else math.nan,
        tflite_seconds=measured.seconds,
    )


@dataclass(frozen=True)
class FileFigures:
    path: Path
    accuracy: float  # validation top-1 in the file's runtime; NaN when not measured here
    size_kb: float
    ram_kb: float
    latency_ms: float
    seconds: float = math.nan  # writing (a .tflite file only) and measuring it


def measure_onnx(path: Path, data: Dataset, resolution: int) -> FileFigures:
    """The ONNX file's bytes, peak memory and latency (its accuracy is measured as it is
    written)."""
    return FileFigures(
        path, math.nan, file_size_kb(path), file_ram_kb(path),
        file_latency_ms(path, data.channels, resolution),
    )  # fmt: skip


def write_tflite_trial(
    model: torch.nn.Module,
    data: Dataset,
    path: Path,
    train: TrainConfig,
    seed: int,
    on_step: StepCallback,
) -> FileFigures:
    """`model` as an int8 .tflite file at `path` (calibrated on the ONNX file's images),
    measured in LiteRT: validation top-1, bytes, peak memory, latency."""
    from compsearch.objectives import tflite  # litert-torch, only under --format tflite

    started = time.perf_counter()
    resolution = train.test_resolution
    calibration = calibration_images(data, resolution, CALIBRATION_IMAGES, seed)
    on_step("writing the int8 .tflite file")
    tflite.write_tflite(model, calibration, path)
    on_step("measuring the .tflite file in LiteRT")
    accuracy = tflite.tflite_accuracy(path, data.val, data, resolution)
    ram_kb, latency_ms = tflite.tflite_ram_kb(path), tflite.tflite_latency_ms(path)
    return FileFigures(
        path, accuracy, file_size_kb(path), ram_kb, latency_ms, time.perf_counter() - started
    )


@dataclass(frozen=True)
class Deployed:
    model: torch.nn.Module  # what the file holds: the trained model or its tuned copy
    path: Path
    accuracy: float  # top-1 of the file in onnxruntime on the split measured
    accuracy_post_training: float  # of the file as first exported
    quantization_aware: bool  # whether the file comes from the quantization-aware copy


def lost_too_much(accuracy_torch: float, post_training: float) -> bool:
    """Whether a post-training int8 file lost more than QUANTIZATION_AWARE_THRESHOLD
    against the fp32 model: then the quantization-aware fine-tune is tried."""
    # Rounded: accuracies are fractions of images, and a loss of exactly the threshold
    # (0.9 - 0.897) comes out as 0.0030000000000000027 unrounded.
    return round(accuracy_torch - post_training, 9) > QUANTIZATION_AWARE_THRESHOLD


def deploy(
    model: torch.nn.Module,
    config: TrialConfig,
    data: Dataset,
    on_device: DeviceData,
    path: Path,
    split: Split,
    seed: int,
    accuracy_torch: float,
    on_step: StepCallback = no_step,
) -> Deployed:
    """Write the deployable file for `config.compress.precision` to `path` and measure it
    on `split` in onnxruntime. An int8 file that loses more than
    QUANTIZATION_AWARE_THRESHOLD against `accuracy_torch` (the fp32 model on `split`) is
    tried again after a quantization-aware fine-tune, kept if it measures better."""
    train = config.train
    precision = config.compress.precision
    calibration = None
    if precision == "int8":
        calibration = calibration_images(data, train.test_resolution, CALIBRATION_IMAGES, seed)

    def write(model: torch.nn.Module, path: Path) -> float:
        return write_and_measure(
            model, precision, precision, path, data, split, train.test_resolution, calibration,
            on_step,
        )  # fmt: skip

    measured = write(model, path)
    first = Deployed(model, path, measured, measured, quantization_aware=False)
    if precision != "int8" or not lost_too_much(accuracy_torch, measured):
        return first
    on_step("the quantization-aware fine-tune")
    try:
        tuned = quantization_aware_copy(model, on_device, train, seed)
    except TrainingDiverged:
        # Should the fine-tune blow up (one that trained the folded weights did, on a
        # ResNet-8 on CIFAR-10), the post-training file stands.
        return first
    candidate = path.with_name(path.stem + "-quantization-aware.onnx")
    measured_tuned = write(tuned, candidate)
    if measured_tuned <= measured:
        candidate.unlink()
        return first
    candidate.replace(path)
    return Deployed(tuned, path, measured_tuned, measured, quantization_aware=True)


def write_and_measure(
    model: torch.nn.Module,
    precision: str,
    name: str,
    path: Path,
    data: Dataset,
    split: Split,
    resolution: int,
    calibration: torch.Tensor | None,
    on_step: StepCallback,
) -> float:
    """Write `model` (left untouched) as a `precision` file at `path`; its top-1 on
    `split` in onnxruntime. `name` is what the steps call the file."""
    on_step(f"exporting the {name} file")
    copied = copy.deepcopy(model).cpu().eval()
    export(copied, precision, resolution, data.channels, path, calibration)
    on_step(f"measuring the {name} file in onnxruntime")
    return onnx_accuracy(path, split, data, resolution)


def quantization_aware_copy(
    model: torch.nn.Module,
    on_device: DeviceData,
    train: TrainConfig,
    seed: int,
    learning_rate_factor: float | None = None,
) -> torch.nn.Module:
    """A copy of `model` after the quantization-aware fine-tune that trials and exports
    share, its peak learning rate `learning_rate_factor` (by default
    QUANTIZATION_AWARE_LEARNING_RATE_FACTOR) times the pruning fine-tune's; raises
    TrainingDiverged when it blows up."""
    if learning_rate_factor is None:
        learning_rate_factor = QUANTIZATION_AWARE_LEARNING_RATE_FACTOR
    images = len(on_device.train) * train.epochs * QUANTIZATION_AWARE_IMAGE_SHARE
    epochs = max(1, math.ceil(images / len(on_device.train)))
    draw = on_device.subset(max(train.batch_size, round(images / epochs)))
    phase = dataclasses.replace(finetune_phase(train, learning_rate_factor), epochs=epochs)
    generator = torch.Generator().manual_seed(seed + 1)
    return quantization_aware_finetune(model, draw, phase, generator)


@dataclass(frozen=True)
class Candidate:
    """One deployable file of a trained model, as the export measures it to choose."""

    name: str  # "fp32", "fp16", "int8 post-training" or "int8 quantization-aware"
    precision: str
    quantization_aware: bool
    accuracy: float  # validation top-1 of the file in onnxruntime; NaN when not written
    params: int
    macs: int
    size_kb: float  # of the file, or the estimate when not written
    ram_kb: float  # peak activation memory of the file, or the estimate when not written
    latency_ms: float  # of the file as measured here; NaN when not written
    path: Path | None  # None when not written
    model: torch.nn.Module | None  # what the file holds (the tuned copy for QAT)
    note: str = ""  # why it was not written, or "" when it was

    @property
    def written(self) -> bool:
        return self.path is not None

    def excess(self, budgets: Budgets) -> list[str]:
        return budgets.excess(self.params, self.size_kb, self.macs, self.ram_kb, self.latency_ms)


def compression_candidates(
    model: torch.nn.Module,
    config: TrialConfig,
    data: Dataset,
    on_device: DeviceData,
    folder: Path,
    seed: int,
    precisions: tuple[str, ...],
    budgets: Budgets,
    on_step: StepCallback = no_step,
    seconds_left: Callable[[], float] | None = None,
    quantization_aware_seconds: float = 0.0,
    flip: bool = False,
) -> list[Candidate]:
    """Every file of the trained, pruned `model` (its widths in `config.arch`) that can
    fit the budgets, each measured on the validation split: fp32 and fp16, int8 after
    post-training calibration, and int8 after a quantization-aware fine-tune. A precision
    over the budgets by estimate is listed with the reason and not written. Under a time
    limit (`seconds_left()`, the seconds it leaves), the fine-tune, predicted to take
    `quantization_aware_seconds`, runs only if they are left; otherwise it is listed with
    the reason. With `flip`, every file holds the model flip-averaged (FlipAveraged): the
    mean of its outputs on the image and its mirror, at twice the MACs, counted so."""
    train = config.train
    runs = 2 if flip else 1  # the model runs on the image and on its mirror
    unpruned = dataclasses.replace(config.compress, prune_fraction=0.0)  # arch is pruned
    candidates = []
    for precision in precisions:
        names = (
            ["int8 post-training", "int8 quantization-aware"]
            if precision == "int8"
            else [precision]
        )
        compress = dataclasses.replace(unpruned, precision=precision)
        expected = estimate(dataclasses.replace(config, compress=compress))
        # A flip-averaged file runs a batch of the image and its mirror: twice the MACs
        # and twice the activation memory (measured: 393,216 bytes for ResNet-8's fp32
        # file, 196,608 without).
        expected = dataclasses.replace(
            expected, macs=runs * expected.macs, ram_bytes=runs * expected.ram_bytes
        )
        over = budgets.excess(expected.params, expected.size_kb, expected.macs, expected.ram_kb)
        if over:
            note = "over budget by estimate, not written: " + ", ".join(over)
            candidates += [
                Candidate(name, precision, "aware" in name, math.nan, expected.params,
                          expected.macs, expected.size_kb, expected.ram_kb, math.nan, None,
                          None, note)
                for name in names
            ]  # fmt: skip
            continue
        calibration = None
        if precision == "int8":
            calibration = calibration_images(data, train.test_resolution, CALIBRATION_IMAGES, seed)
        for name in names:
            aware = name == "int8 quantization-aware"
            written = model
            if aware and seconds_left is not None and seconds_left() < quantization_aware_seconds:
                note = (
                    f"not run: the fine-tune takes about {quantization_aware_seconds:.0f} s "
                    f"and --time leaves {max(0.0, seconds_left()):.0f} s"
                )
                candidates.append(
                    Candidate(name, precision, True, math.nan, expected.params,
                              expected.macs, expected.size_kb, expected.ram_kb, math.nan,
                              None, None, note)
                )  # fmt: skip
                continue
            if aware:
                on_step("the quantization-aware fine-tune")
                try:
                    written = quantization_aware_copy(model, on_device, train, seed)
                except TrainingDiverged as error:
                    candidates.append(
                        Candidate(name, precision, True, math.nan, expected.params,
                                  expected.macs, expected.size_kb, expected.ram_kb, math.nan,
                                  None, None, f"the fine-tune diverged ({error})")
                    )  # fmt: skip
                    continue
            if flip:
                written = FlipAveraged(written)
            path = folder / f"model-{name.replace(' ', '-')}.onnx"
            measured = write_and_measure(
                written, precision, name, path, data, data.val, train.test_resolution,
                calibration, on_step,
            )  # fmt: skip
            copied = copy.deepcopy(written).cpu().eval()
            candidates.append(
                Candidate(
                    name, precision, aware, measured, count_params(copied),
                    count_macs(copied, data.channels, train.test_resolution),
                    file_size_kb(path), file_ram_kb(path),
                    file_latency_ms(path, data.channels, train.test_resolution), path, written,
                )
            )  # fmt: skip
    return candidates


def best_candidate(candidates: list[Candidate], budgets: Budgets) -> Candidate | None:
    """The most accurate written file within the budgets (the smaller on a tie)."""
    fitting = [c for c in candidates if c.written and not c.excess(budgets)]
    return max(fitting, key=lambda c: (c.accuracy, -c.size_kb), default=None)
