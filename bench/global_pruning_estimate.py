"""How close the estimate before training comes to what global pruning leaves.

Samples configs of a dataset's default space with global pruning (every fraction and
criterion the space holds), prunes each freshly built network (batch-norm scales drawn
at random, as training leaves them distinct) and compares the parameters and peak
memory left with two estimates: local pruning at the same share (the estimate before
global pruning had its own) and `global_pruned_arch` (the widths global pruning may not
thin kept whole). Untrained weights rank channels otherwise than trained ones, so this
measures the structural part of the error, not the part that depends on the weights.

    python bench/global_pruning_estimate.py [--configs 60] [--results FILE.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import optuna
import torch
from workers_throughput import cpu_name  # bench/, beside this script

from compsearch.objectives.compress import prune
from compsearch.objectives.measure import count_params
from compsearch.spaces.builder import build
from compsearch.spaces.config import TrainConfig
from compsearch.spaces.estimate import (
    channel_ratio,
    count_layers,
    global_pruned_arch,
    pruned_arch,
)
from compsearch.spaces.memory import estimate_peak_bytes
from compsearch.spaces.space import sample, space_for

SCHEDULE = TrainConfig(1, 0, 32, 32, 64, 0.1, 0.0, 0.0)


def relative(estimate: float, real: float) -> float:
    return estimate / real - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = dataclasses.replace(
        space_for(3, 10, 32), prune_fraction=(0.3, 0.7), prune_scopes=("global",)
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    rows = []
    while len(rows) < args.configs:
        config = sample(study.ask(), space, SCHEDULE)
        arch, compress = config.arch, config.compress
        torch.manual_seed(len(rows))
        model = build(arch).eval()
        for norm in model.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.weight.data.uniform_(0.5, 1.5)
        example = torch.randn(4, 3, 32, 32)

        def loss(net, example=example):
            return net(example).square().mean()

        left = prune(model, arch, compress, example[:1], loss)
        real = count_params(model)
        local = pruned_arch(arch, channel_ratio(arch, compress.prune_fraction))
        expected = global_pruned_arch(arch, compress.prune_fraction)
        ram = estimate_peak_bytes(left, 32, "int8")
        rows.append(
            {
                "blocks": "/".join(stage.block for stage in arch.stages),
                "fraction": compress.prune_fraction,
                "criterion": compress.prune_criterion,
                "params": count_params(build(arch)),
                "left": real,
                "local": relative(count_layers(local, 1).params, real),
                "global": relative(count_layers(expected, 1).params, real),
                "ram_local": relative(estimate_peak_bytes(local, 32, "int8"), ram),
                "ram_global": relative(estimate_peak_bytes(expected, 32, "int8"), ram),
            }
        )
        print(
            f"{len(rows):3d} {rows[-1]['blocks']:28s} {compress.prune_fraction:.1f} "
            f"{compress.prune_criterion:8s} left {real:>9,} local {rows[-1]['local']:+.1%} "
            f"global {rows[-1]['global']:+.1%}",
            flush=True,
        )
    lines = [
        f"`python bench/global_pruning_estimate.py --configs {args.configs}`: {len(rows)} "
        "configs of the CIFAR-10 default space (32 px), global pruning of 30-70% of the "
        f"parameters, untrained networks; machine: {cpu_name()}, "
        f"torch {torch.__version__}. Error = estimate / what pruning left - 1.",
        "",
        "| estimate | params: mean abs error | params: worst | under by more than 10% | "
        "peak int8 memory: mean abs error | worst |",
        "|---|---|---|---|---|---|",
    ]
    for name, key, ram_key in (
        ("local pruning at the share", "local", "ram_local"),
        ("global_pruned_arch", "global", "ram_global"),
    ):
        errors = [row[key] for row in rows]
        ram_errors = [row[ram_key] for row in rows]
        lines.append(
            f"| {name} | {statistics.mean(abs(e) for e in errors):.1%} | "
            f"{min(errors, key=lambda e: -abs(e)):+.1%} | "
            f"{sum(e < -0.1 for e in errors)} of {len(rows)} | "
            f"{statistics.mean(abs(e) for e in ram_errors):.1%} | "
            f"{min(ram_errors, key=lambda e: -abs(e)):+.1%} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        args.results.write_text(text)


if __name__ == "__main__":
    main()
