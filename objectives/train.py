"""The trainer: whole-tensor data, batch augmentation, FixRes phases.

One phase trains at one resolution with a warm-up then a linear decay of the learning
rate. A trial runs a long phase at the low training resolution, prunes, then a short
phase at the test resolution, which both recovers from pruning and adapts the network to
the resolution it will be deployed at (FixRes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compsearch.objectives.data import Dataset, Split, augment, normalize

EpochCallback = Callable[[int, int, int], None]  # (epoch done, epochs in phase, resolution)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class Phase:
    resolution: int  # pixels
    epochs: int
    peak_learning_rate: float
    warmup_fraction: float  # of the phase's steps spent ramping the learning rate up
    batch_size: int
    weight_decay: float
    label_smoothing: float


def translation_pad(resolution: int) -> int:
    """Pixels of random translation: an eighth of the image side (4 px at 32 px)."""
    return max(1, resolution // 8)


def fit(
    model: nn.Module,
    data: Dataset,
    phase: Phase,
    generator: torch.Generator,
    on_epoch: EpochCallback | None = None,
) -> float:
    """Train `model` in place for one phase; returns the mean loss of the last epoch."""
    device = next(model.parameters()).device
    train = data.train.to(device)
    steps_per_epoch = math.ceil(len(train) / phase.batch_size)
    total_steps = max(1, phase.epochs * steps_per_epoch)
    warmup_steps = max(1, round(phase.warmup_fraction * total_steps))
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=phase.peak_learning_rate,
        momentum=0.9,
        nesterov=True,
        weight_decay=phase.weight_decay,
    )

    def learning_rate_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    pad = translation_pad(data.resolution)
    model.train()
    mean_loss = float("nan")
    for epoch in range(phase.epochs):
        order = torch.randperm(len(train), generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, len(train), phase.batch_size):
            index = order[start : start + phase.batch_size]
            images = augment(train.images[index], pad, data.flip, generator)
            x = normalize(images, data.mean, data.std, phase.resolution)
            loss = F.cross_entropy(
                model(x), train.labels[index], label_smoothing=phase.label_smoothing
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(index)
        mean_loss = loss_sum.item() / len(train)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(
                f"training loss became {mean_loss} in epoch {epoch + 1} at "
                f"{phase.resolution} px (learning rate {phase.peak_learning_rate})"
            )
        if on_epoch is not None:
            on_epoch(epoch + 1, phase.epochs, phase.resolution)
    model.eval()
    return mean_loss


@torch.no_grad()
def predict(
    model: nn.Module, split: Split, data: Dataset, resolution: int, batch_size: int = 1024
) -> torch.Tensor:
    """Predicted class of every image in `split` (torch, eval mode)."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(device)
        out.append(model(normalize(images, data.mean, data.std, resolution)).argmax(1).cpu())
    return torch.cat(out)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return (predictions == labels.cpu()).float().mean().item()
