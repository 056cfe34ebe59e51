"""The search space as data, its TOML form, and the one function that asks Optuna for values."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI
    import tomli as tomllib

from compsearch.spaces.blocks import ACTIVATIONS, BLOCKS, get_block, squeeze_width_for
from compsearch.spaces.config import (
    MAX_PRUNE_FRACTION,
    PRECISIONS,
    PRUNE_CRITERIA,
    PRUNE_SCOPES,
    ArchConfig,
    CompressConfig,
    StageConfig,
    TrainConfig,
    TrialConfig,
    block_shapes,
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


class SpaceError(ValueError):
    """A search space that cannot be searched; the message lists every problem."""


# What the data fixes; a space file cannot set these.
DATA_FIELDS = ("in_channels", "num_classes", "test_resolution")


@dataclass(frozen=True)
class SearchSpace:
    # What the data fixes.
    in_channels: int
    num_classes: int
    test_resolution: int  # pixels
    # What is searched: [low, high] ranges, inclusive, and lists of choices. Every stage
    # draws its own block, depth, width, kernel size, stride and options from them.
    stages: int = 3
    stem_width: tuple[int, int] = (8, 64)  # channels, sampled on a log scale
    depth: tuple[int, int] = (1, 3)  # blocks per stage
    width: tuple[int, int] = (8, 128)  # channels per stage, sampled on a log scale
    kernel_sizes: tuple[int, ...] = (3, 5)
    strides: tuple[int, ...] = (1, 2)  # stride of a stage's first block
    blocks: tuple[str, ...] = ("plain", "basic", "dwsep", "inverted", "grouped")
    expansions: tuple[float, ...] = (2, 4, 6)  # inner width / input width, "inverted" blocks
    groups: tuple[int, ...] = (2, 4, 8)  # convolution groups, "grouped" blocks
    squeeze_excitation: tuple[bool, ...] = (False, True)  # per stage
    activations: tuple[str, ...] = ACTIVATIONS
    leaky_relu_slope: tuple[float, float] = (0.01, 0.3)  # sampled on a log scale
    train_resolutions: tuple[int, ...] = ()  # pixels; empty means derived from the test one
    precisions: tuple[str, ...] = PRECISIONS
    # Fraction of the parameters pruning removes, sampled on a grid of `prune_fraction_step`.
    prune_fraction: tuple[float, float] = (0.0, 0.7)
    prune_fraction_step: float = 0.1
    prune_criteria: tuple[str, ...] = PRUNE_CRITERIA
    prune_scopes: tuple[str, ...] = PRUNE_SCOPES

    def __post_init__(self) -> None:
        if not self.train_resolutions:
            # FixRes: train at half, three quarters or all of the test resolution.
            derived = sorted({max(4, round(self.test_resolution * f)) for f in (0.5, 0.75, 1.0)})
            object.__setattr__(self, "train_resolutions", tuple(derived))
        problems = self.problems()
        if problems:
            raise SpaceError("; ".join(problems))

    def problems(self) -> list[str]:
        """Everything wrong with the space, each as 'what must hold, but got what'."""
        found = []

        def positive(name: str, values: tuple) -> None:
            if not values:
                found.append(f"{name} needs at least one choice")
            elif any(not isinstance(v, int | float) or v <= 0 for v in values):
                found.append(f"{name} must hold numbers > 0, but got {list(values)}")

        def known(name: str, values: tuple, valid: tuple) -> None:
            if not values:
                found.append(f"{name} needs at least one choice")
            for value in values:
                if value not in valid:
                    found.append(f"{name}: unknown {value!r}; valid: {', '.join(map(str, valid))}")

        for name in ("stem_width", "depth", "width"):
            low, high = getattr(self, name)
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
                found.append(f"{name}: 1 <= low <= high must hold, but got [{low}, {high}]")
        if not isinstance(self.stages, int) or not 1 <= self.stages <= 8:
            found.append(f"stages must be a whole number from 1 to 8, but got {self.stages!r}")
        positive("kernel_sizes", self.kernel_sizes)
        if any(isinstance(k, int) and k % 2 == 0 for k in self.kernel_sizes):
            found.append(f"kernel_sizes must be odd, but got {list(self.kernel_sizes)}")
        positive("strides", self.strides)
        positive("expansions", self.expansions)
        positive("groups", self.groups)
        positive("train_resolutions", self.train_resolutions)
        if any(r > self.test_resolution for r in self.train_resolutions):
            found.append(
                f"train_resolutions must be <= the test resolution {self.test_resolution}, "
                f"but got {list(self.train_resolutions)}"
            )
        known("blocks", self.blocks, tuple(sorted(BLOCKS)))
        known("activations", self.activations, ACTIVATIONS)
        known("precisions", self.precisions, PRECISIONS)
        known("squeeze_excitation", self.squeeze_excitation, (False, True))
        low, high = self.leaky_relu_slope
        if not 0 < low <= high < 1:
            found.append(f"leaky_relu_slope: 0 < low <= high < 1 must hold, but got {[low, high]}")
        known("prune_criteria", self.prune_criteria, PRUNE_CRITERIA)
        known("prune_scopes", self.prune_scopes, PRUNE_SCOPES)
        low, high = self.prune_fraction
        if not 0 <= low <= high <= MAX_PRUNE_FRACTION:
            found.append(
                f"prune_fraction: 0 <= low <= high <= {MAX_PRUNE_FRACTION} must hold, "
                f"but got {[low, high]}"
            )
        elif high > low and not 0 < self.prune_fraction_step <= high - low:
            found.append(
                f"prune_fraction_step must be > 0 and at most high - low, but got "
                f"{self.prune_fraction_step}"
            )
        return found

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpace:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(self).items()
        }

    def to_toml(self) -> str:
        """The space as a file `--space` reads back (the data's fields as comments)."""
        lines = ["# The search space compsearch searched. Edit and pass back with --space."]
        for name, value in self.to_dict().items():
            prefix = "# fixed by the dataset: " if name in DATA_FIELDS else ""
            lines.append(f"{prefix}{name} = {toml_value(value)}")
        return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def space_for(in_channels: int, num_classes: int, test_resolution: int) -> SearchSpace:
    """The default space for a dataset: larger images get more stages and deeper ones,
    more classes and larger images get wider layers."""
    scale = (2 if test_resolution >= 64 else 1) * (2 if num_classes > 20 else 1)
    return SearchSpace(
        in_channels,
        num_classes,
        test_resolution,
        stages=3 if test_resolution <= 32 else 4,
        stem_width=(8, 64 * scale),
        depth=(1, 3) if test_resolution <= 16 else (1, 4),
        width=(8 if num_classes <= 20 else 16, 128 * scale),
    )


def load_space(path: Path, base: SearchSpace) -> SearchSpace:
    """`base` with the fields a TOML file sets; every problem is reported at once, with
    where the fields are documented."""
    try:
        return read_space(path, base)
    except SpaceError as error:
        raise SpaceError(f"{error}; see the README's 'Search space' section") from None


def read_space(path: Path, base: SearchSpace) -> SearchSpace:
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise SpaceError(f"space file {path} is a folder; give a TOML file") from None
    except UnicodeDecodeError as error:
        raise SpaceError(
            f"space file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at "
            f"offset {error.start}); save it as UTF-8"
        ) from None
    except OSError as error:
        raise SpaceError(f"cannot read space file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise SpaceError(f"space file {path} is not valid TOML: {error}") from None
    fields = {field.name: field for field in dataclasses.fields(SearchSpace)}
    problems = []
    values: dict[str, Any] = {}
    for name, value in table.items():
        if name in DATA_FIELDS:
            problems.append(f"{name} is fixed by the dataset and cannot be set")
        elif name not in fields:
            valid = ", ".join(n for n in fields if n not in DATA_FIELDS)
            problems.append(f"unknown field {name!r} (valid: {valid})")
        elif isinstance(getattr(base, name), tuple):
            if not isinstance(value, list):
                problems.append(
                    f"{name} must be a list such as {toml_value(list(getattr(base, name)))}"
                )
            else:
                values[name] = tuple(value)
        else:
            values[name] = value
    for name in ("stem_width", "depth", "width", "leaky_relu_slope", "prune_fraction"):
        if name in values and len(values[name]) != 2:
            problems.append(f"{name} must be [low, high], but got {list(values[name])}")
    if not problems:
        try:
            return dataclasses.replace(base, **values)
        except SpaceError as error:
            problems.append(str(error))
        except TypeError as error:
            problems.append(str(error))
    raise SpaceError(f"space file {path}: " + "; ".join(problems))


def make_stage(
    block: str,
    depth: int,
    in_width: int,
    width: int,
    kernel_size: int,
    stride: int,
    expansion: float,
    groups: int,
    squeeze_excitation: bool,
) -> StageConfig:
    """A freshly sampled stage: inner widths follow from the block type and its options."""
    block_type = get_block(block)
    groups = groups if block_type.uses_groups else 1
    projection = stride != 1 or in_width != width
    inputs = [in_width] + [width] * (depth - 1)
    hidden = tuple(block_type.hidden_width(w, width, expansion, groups) for w in inputs)
    stage = StageConfig(block, depth, width, kernel_size, stride, hidden, projection, groups)
    if not squeeze_excitation:
        return stage
    arch = ArchConfig(1, 1, in_width, 3, "relu", 0.1, stages=(stage,))
    squeeze = tuple(
        squeeze_width_for(block_type.gated_width(shape)) for _, shape in block_shapes(arch)
    )
    return dataclasses.replace(stage, squeeze_widths=squeeze)


def sample(trial: Suggester, space: SearchSpace, schedule: TrainConfig) -> TrialConfig:
    """Ask the trial for one config. The only place that calls `suggest_*`.

    Every parameter is asked for in every trial, used or not (a stage's expansion when
    its block is not "inverted", say), so every sampler sees one fixed space.
    """
    activation = trial.suggest_categorical("activation", list(space.activations))
    slope = trial.suggest_float("leaky_relu_slope", *space.leaky_relu_slope, log=True)
    stem_width = trial.suggest_int("stem_width", *space.stem_width, log=True)
    stages = []
    in_width = stem_width
    for index in range(1, space.stages + 1):
        name = f"stage{index}_"
        width = trial.suggest_int(name + "width", *space.width, log=True)
        stage = make_stage(
            block=trial.suggest_categorical(name + "block", list(space.blocks)),
            depth=trial.suggest_int(name + "depth", *space.depth),
            in_width=in_width,
            width=width,
            kernel_size=trial.suggest_categorical(name + "kernel_size", list(space.kernel_sizes)),
            stride=trial.suggest_categorical(name + "stride", list(space.strides)),
            expansion=trial.suggest_categorical(name + "expansion", list(space.expansions)),
            groups=trial.suggest_categorical(name + "groups", list(space.groups)),
            squeeze_excitation=trial.suggest_categorical(
                name + "squeeze_excitation", list(space.squeeze_excitation)
            ),
        )
        stages.append(stage)
        in_width = width
    arch = ArchConfig(
        in_channels=space.in_channels,
        num_classes=space.num_classes,
        stem_width=stem_width,
        stem_kernel_size=3,
        activation=activation,
        leaky_relu_slope=round(slope, 4),
        stages=tuple(stages),
    )
    train = dataclasses.replace(
        schedule,
        train_resolution=trial.suggest_categorical(
            "train_resolution", list(space.train_resolutions)
        ),
        test_resolution=space.test_resolution,
    )
    low, high = space.prune_fraction
    compress = CompressConfig(
        precision=trial.suggest_categorical("precision", list(space.precisions)),
        # Rounded: Optuna's float grid yields values such as 0.30000000000000004.
        prune_fraction=round(
            trial.suggest_float("prune_fraction", low, high, step=space.prune_fraction_step)
            if high > low
            else trial.suggest_float("prune_fraction", low, high),
            6,
        ),
        prune_criterion=trial.suggest_categorical("prune_criterion", list(space.prune_criteria)),
        prune_scope=trial.suggest_categorical("prune_scope", list(space.prune_scopes)),
    )
    return TrialConfig(arch=arch, train=train, compress=compress)
