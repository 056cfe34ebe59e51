"""Known architectures, written as configs of the search space: the first trials of a new
study, so the search starts from what a person would pick by hand and must beat it.

Each anchor is the parameters `sample` asks for, with the stage layout of its paper
mapped onto the space's stages, trained at the test resolution, int8 and unpruned, as a
person deploying it would. An anchor over the budgets is shrunk to fit (`fit_to_budget`),
and one the space cannot express (a block or choice it leaves out) is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from compsearch.results.records import anchor_attrs, read_trials
from compsearch.search.loop import fit_to_budget
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.config import TrainConfig
from compsearch.spaces.estimate import estimate
from compsearch.spaces.space import SearchSpace, sample


@dataclass(frozen=True)
class Stage:
    block: str
    depth: int
    width: int
    stride: int
    expansion: float = 6  # inverted blocks only


@dataclass(frozen=True)
class Anchor:
    stem_width: int
    stages: tuple[Stage, ...]  # mapped onto the space's stages: repeated or merged
    activation: str = "relu"


def basic(depth: int) -> tuple[Stage, ...]:
    return (
        Stage("basic", depth, 16, 1),
        Stage("basic", depth, 32, 2),
        Stage("basic", depth, 64, 2),
    )


ANCHORS: dict[str, Anchor] = {
    # MLPerf Tiny's image-classification reference: one basic block per stage, 16/32/64.
    "resnet8": Anchor(16, basic(1)),
    # He et al.'s CIFAR ResNet-20: three basic blocks per stage, 16/32/64.
    "resnet20": Anchor(16, basic(3)),
    # MobileNetV2's inverted residuals with expansion 6, at CIFAR-sized widths.
    "mobilenetv2": Anchor(
        32, (Stage("inverted", 2, 24, 1), Stage("inverted", 3, 32, 2), Stage("inverted", 3, 64, 2))
    ),
    # DS-CNN (MLPerf Tiny's keyword spotting): depthwise-separable blocks of 64 channels.
    "dscnn": Anchor(
        64, (Stage("dwsep", 2, 64, 2), Stage("dwsep", 1, 64, 1), Stage("dwsep", 1, 64, 1))
    ),
}


def clamp(value: float, bounds: tuple[float, float]) -> Any:
    low, high = bounds
    return type(low)(min(max(value, low), high))


def anchor_params(anchor: Anchor, space: SearchSpace) -> dict[str, Any] | None:
    """The anchor as the parameters of `space`, or None when the space cannot express it.
    Widths and depths are clamped to the space's ranges; a stage layout longer or shorter
    than the space's stages is cut or its last stage repeated."""
    stages = [anchor.stages[min(i, len(anchor.stages) - 1)] for i in range(space.stages)]
    params: dict[str, Any] = {
        "activation": anchor.activation,
        "leaky_relu_slope": space.leaky_relu_slope[0],
        "stem_width": clamp(anchor.stem_width, space.stem_width),
        "train_resolution": space.test_resolution,
        "precision": "int8",
        "prune_fraction": space.prune_fraction[0],
        "prune_criterion": space.prune_criteria[0],
        "prune_scope": space.prune_scopes[0],
    }
    for index, stage in enumerate(stages, start=1):
        name = f"stage{index}_"
        params |= {
            name + "width": clamp(stage.width, space.width),
            name + "block": stage.block,
            name + "depth": clamp(stage.depth, space.depth),
            name + "kernel_size": 3,
            name + "stride": stage.stride,
            name + "expansion": stage.expansion,
            name + "groups": space.groups[0],
            name + "squeeze_excitation": False,
        }
    choices = {
        "activation": space.activations,
        "train_resolution": space.train_resolutions,
        "precision": space.precisions,
    }
    per_stage = {
        "block": space.blocks,
        "kernel_size": space.kernel_sizes,
        "stride": space.strides,
        "expansion": space.expansions,
        "squeeze_excitation": space.squeeze_excitation,
    }
    for index in range(1, space.stages + 1):
        choices |= {f"stage{index}_{name}": allowed for name, allowed in per_stage.items()}
    if any(params[name] not in allowed for name, allowed in choices.items()):
        return None
    return params


def queue_anchors(
    study: optuna.Study,
    space: SearchSpace,
    schedule: TrainConfig,
    budgets: Budgets,
    say: Callable[[str], None],
    file_format: str = "onnx",
) -> list[str]:
    """Queue every anchor the space can express and the budgets allow for files in
    `file_format` (shrunk to fit where needed) as the study's next trials; the names
    queued. An anchor already in the
    study is not queued again."""
    present = {record.anchor for record in read_trials(study.get_trials(deepcopy=False))}
    queued, notes = [], []
    for name, anchor in ANCHORS.items():
        if name in present:
            continue
        params = anchor_params(anchor, space)
        if params is None:
            notes.append(f"{name} (the space cannot express it)")
            continue
        expected = estimate(sample(optuna.trial.FixedTrial(params), space, schedule), file_format)
        if budgets.excess(expected.params, expected.size_kb, expected.macs, expected.ram_kb):
            params = fit_to_budget(params, space, schedule, budgets, file_format)
            if params is None:
                notes.append(f"{name} (nothing of it fits the budgets)")
                continue
            name_shown = f"{name} (narrowed to fit)"
        else:
            name_shown = name
        study.enqueue_trial(params, user_attrs=anchor_attrs(name))
        queued.append(name_shown)
    if queued:
        say(f"anchors queued as the first trials: {', '.join(queued)}")
    if notes:
        say(f"anchors left out: {'; '.join(notes)}")
    return queued
