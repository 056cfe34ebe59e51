"""One trial, top to bottom: build, train low-res, prune, fine-tune at test res, export,
measure. The result's figures all come from the deployed ONNX file or the pruned model.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compsearch.objectives.compress import export, prune
from compsearch.objectives.data import Dataset
from compsearch.objectives.measure import (
    calibration_images,
    count_macs,
    count_params,
    file_size_kb,
    onnx_accuracy,
)
from compsearch.objectives.train import EpochCallback, Phase, accuracy, fit, predict
from compsearch.spaces.builder import build
from compsearch.spaces.config import TrialConfig

CALIBRATION_IMAGES = 256  # training images that calibrate int8 activation ranges
FINETUNE_LEARNING_RATE_FACTOR = 0.2  # fine-tune peak learning rate / training peak


@dataclass(frozen=True)
class TrialResult:
    config: TrialConfig  # as deployed: widths after pruning
    accuracy: float  # validation top-1 of the ONNX file in onnxruntime
    accuracy_before_compression: float  # validation top-1 of the torch fp32 model
    params: int
    macs: int
    size_kb: float  # ONNX file bytes / 1000
    onnx_path: Path
    seconds: float


def run_trial(
    config: TrialConfig,
    data: Dataset,
    folder: Path,
    seed: int,
    device: torch.device | str = "cpu",
    on_epoch: EpochCallback | None = None,
) -> TrialResult:
    started = time.perf_counter()
    train = config.train
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build(config.arch).to(device).to(memory_format=torch.channels_last)

    low_resolution = Phase(
        resolution=train.train_resolution,
        epochs=train.epochs - train.finetune_epochs,
        peak_learning_rate=train.learning_rate,
        warmup_fraction=0.15,
        batch_size=train.batch_size,
        weight_decay=train.weight_decay,
        label_smoothing=train.label_smoothing,
    )
    fit(model, data, low_resolution, generator, on_epoch)

    example = torch.zeros(1, data.channels, train.test_resolution, train.test_resolution)
    arch = prune(model, config.arch, config.compress.prune_ratio, example.to(device))
    config = dataclasses.replace(config, arch=arch)

    test_resolution = dataclasses.replace(
        low_resolution,
        resolution=train.test_resolution,
        epochs=train.finetune_epochs,
        peak_learning_rate=train.learning_rate * FINETUNE_LEARNING_RATE_FACTOR,
        warmup_fraction=0.0,
    )
    fit(model, data, test_resolution, generator, on_epoch)

    model = model.cpu().eval()
    accuracy_torch = accuracy(
        predict(model, data.val, data, train.test_resolution), data.val.labels
    )
    calibration = None
    if config.compress.precision == "int8":
        calibration = calibration_images(data, train.test_resolution, CALIBRATION_IMAGES, seed)
    path = export(
        model,
        config.compress.precision,
        train.test_resolution,
        data.channels,
        folder / "model.onnx",
        calibration,
    )
    return TrialResult(
        config=config,
        accuracy=onnx_accuracy(path, data.val, data, train.test_resolution),
        accuracy_before_compression=accuracy_torch,
        params=count_params(model),
        macs=count_macs(model, data.channels, train.test_resolution),
        size_kb=file_size_kb(path),
        onnx_path=path,
        seconds=time.perf_counter() - started,
    )
