"""The search space as data, and the one function that asks Optuna for values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

from compsearch.spaces.blocks import ACTIVATIONS
from compsearch.spaces.config import (
    PRECISIONS,
    ArchConfig,
    CompressConfig,
    StageConfig,
    TrainConfig,
    TrialConfig,
)


class Suggester(Protocol):
    """What `sample` needs of an Optuna trial (kept structural so spaces/ needs no Optuna)."""

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int: ...

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class SearchSpace:
    # What the data fixes.
    in_channels: int
    num_classes: int
    test_resolution: int  # pixels
    # What is searched: (low, high) ranges, inclusive, and tuples of choices.
    stages: int = 3
    stem_width: tuple[int, int] = (8, 64)
    depth: tuple[int, int] = (1, 3)  # blocks per stage
    width: tuple[int, int] = (8, 128)  # channels per stage, sampled on a log scale
    kernel_sizes: tuple[int, ...] = (3, 5)
    strides: tuple[int, ...] = (1, 2)
    blocks: tuple[str, ...] = ("basic",)
    activations: tuple[str, ...] = ACTIVATIONS
    train_resolutions: tuple[int, ...] = ()  # pixels; empty means derived from the test one
    precisions: tuple[str, ...] = PRECISIONS
    prune_ratio: tuple[float, float] = (0.0, 0.5)  # fraction of channels removed
    prune_ratio_step: float = 0.1

    def __post_init__(self) -> None:
        if not self.train_resolutions:
            # FixRes: train at half, three quarters or all of the test resolution.
            derived = sorted({max(4, round(self.test_resolution * f)) for f in (0.5, 0.75, 1.0)})
            object.__setattr__(self, "train_resolutions", tuple(derived))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def space_for(in_channels: int, num_classes: int, test_resolution: int) -> SearchSpace:
    return SearchSpace(in_channels, num_classes, test_resolution)


def sample(trial: Suggester, space: SearchSpace, schedule: TrainConfig) -> TrialConfig:
    """Ask the trial for one config. The only place that calls `suggest_*`."""
    activation = trial.suggest_categorical("activation", list(space.activations))
    stem_width = trial.suggest_int("stem_width", *space.stem_width, log=True)
    stages = []
    in_width = stem_width
    for index in range(1, space.stages + 1):
        width = trial.suggest_int(f"stage{index}_width", *space.width, log=True)
        depth = trial.suggest_int(f"stage{index}_depth", *space.depth)
        stride = trial.suggest_categorical(f"stage{index}_stride", list(space.strides))
        stages.append(
            StageConfig(
                block=trial.suggest_categorical(f"stage{index}_block", list(space.blocks)),
                depth=depth,
                width=width,
                kernel_size=trial.suggest_categorical(
                    f"stage{index}_kernel_size", list(space.kernel_sizes)
                ),
                stride=stride,
                hidden_widths=(width,) * depth,
                projection=stride != 1 or in_width != width,
            )
        )
        in_width = width
    arch = ArchConfig(
        in_channels=space.in_channels,
        num_classes=space.num_classes,
        stem_width=stem_width,
        stem_kernel_size=3,
        activation=activation,
        leaky_relu_slope=0.1,
        stages=tuple(stages),
    )
    train = dataclasses.replace(
        schedule,
        train_resolution=trial.suggest_categorical(
            "train_resolution", list(space.train_resolutions)
        ),
        test_resolution=space.test_resolution,
    )
    compress = CompressConfig(
        precision=trial.suggest_categorical("precision", list(space.precisions)),
        # Rounded: Optuna's float grid yields values such as 0.30000000000000004.
        prune_ratio=round(
            trial.suggest_float("prune_ratio", *space.prune_ratio, step=space.prune_ratio_step),
            6,
        ),
    )
    return TrialConfig(arch=arch, train=train, compress=compress)
