"""How long training takes on this device: a few steps of a network, timed, for the cost
model's calibration (search/cost.py)."""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from compsearch.objectives.data import Split
from compsearch.objectives.train import DeviceData, Phase, TrainingDiverged, fit
from compsearch.spaces.builder import build
from compsearch.spaces.config import TrialConfig


def time_training(
    config: TrialConfig, on_device: DeviceData, resolution: int, images: int, seed: int
) -> float:
    """Seconds that one epoch of `images` training images takes for the unpruned network
    of `config` at `resolution`, after one untimed batch that builds the device's kernels
    for these shapes. The model trained is thrown away, and a loss that blew up does not
    matter: the steps took their time all the same."""
    torch.manual_seed(seed)
    model = build(config.arch).to(on_device.device).to(memory_format=torch.channels_last)
    train = config.train
    count = min(images, len(on_device.train))
    probe = copy.copy(on_device)
    probe.train = Split(on_device.train.images[:count], on_device.train.labels[:count])
    warm = copy.copy(on_device)
    warm.train = Split(
        on_device.train.images[: train.batch_size], on_device.train.labels[: train.batch_size]
    )
    phase = Phase.of(train, resolution, epochs=1)
    generator = torch.Generator().manual_seed(seed)
    with contextlib.suppress(TrainingDiverged):
        fit(model, warm, phase, generator)
    synchronize(on_device.device)
    started = time.perf_counter()
    with contextlib.suppress(TrainingDiverged):
        fit(model, probe, phase, generator)
    synchronize(on_device.device)
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
