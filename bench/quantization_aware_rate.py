"""The quantization-aware fine-tune's learning rate, on networks trained to convergence.

A trial fine-tunes with int8 rounding (`trial.quantization_aware_copy`) when its
post-training int8 file loses more than QUANTIZATION_AWARE_THRESHOLD. On CIFAR-10
networks trained to 82-84% that fine-tune, at its learning rate of 0.5 times the pruning
fine-tune's (a tenth of the training's peak), ended below the post-training file
(bench/results/compression_fidelity_cifar10_80.md). This script reruns it on networks
that `bench/compression_fidelity.py --save-models FOLDER` saved, at several learning-rate
factors, each from the same saved network with the same draws, and measures each int8
file on the test split in onnxruntime, with its seconds:

    python bench/quantization_aware_rate.py --dataset folder:../shared/data/cifar10-jpeg \\
        --data-dir ../shared/data --models FOLDER --factors 0.5 0.1 0.02 \\
        --results bench/results/quantization_aware_rate.md

The data split is compression_fidelity's (`--subset 0 --validation-share 0.02`: 49,000
training images), so the fine-tune sees the images the network was trained on.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from cifar10_300kb import machine  # bench/, beside this script
from compression_fidelity import SHARED, Measure, bench_dataset, points

from compsearch.objectives.modelfile import load_model
from compsearch.objectives.quantize import conv_norm_pairs
from compsearch.objectives.train import DeviceData, TrainingDiverged
from compsearch.objectives.trial import (
    QUANTIZATION_AWARE_LEARNING_RATE_FACTOR,
    quantization_aware_copy,
)

# The factor trials used before bench/results/quantization_aware_rate.md, and two below.
FACTORS = (0.5, 0.1, 0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="folder:../shared/data/cifar10-jpeg")
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--subset", type=int, default=0, help="training images (0: all)")
    parser.add_argument("--validation-share", type=float, default=0.02)
    parser.add_argument(
        "--models", type=Path, required=True,
        help="the folder compression_fidelity.py --save-models wrote",
    )  # fmt: skip
    parser.add_argument(
        "--factors", type=float, nargs="*", default=list(FACTORS),
        help="learning-rate factors to fine-tune at (none: only the networks' figures)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, help="also write the table to this .md (.json)")
    args = parser.parse_args()
    files = sorted(args.models.glob("*.pt"))
    if not files:
        raise SystemExit(f"no saved networks (*.pt) in {args.models}; run compression_fidelity.py "
                         "--save-models there first")  # fmt: skip
    if any(factor <= 0 for factor in args.factors):
        raise SystemExit("--factors must be positive")

    data = bench_dataset(args)
    on_device = DeviceData(data, "cpu")
    heading = (
        f"{data.name}: {len(data.train):,} training images, {len(data.test):,} test images; "
        f"machine: {machine()}; autocast of the training {on_device.autocast or 'none (fp32)'}"
        " (the fine-tune itself runs in fp32)"
    )
    print(heading, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        measure = Measure(data, on_device, Path(folder), args.seed)
        for path in files:
            saved = load_model(path, "saved model")
            if saved.config is None:
                print(f"  {path.name}: no config saved, skipped")
                continue
            config, model = saved.config, saved.model.eval()
            schedule = config.train
            base = measure.torch_accuracy(model, schedule.test_resolution)
            post, _, _ = measure.file(model, config, "int8")
            row = {
                "network": path.stem,
                "epochs": schedule.epochs,
                "largest_scale": largest_batchnorm_scale(model),
                "train_seconds": float(saved.facts.get("train_seconds", float("nan"))),
                "torch": base,
                "post_training": post,
                "aware": {},
            }
            for factor in args.factors:
                tick = time.perf_counter()
                try:
                    tuned = quantization_aware_copy(
                        model, on_device, schedule, args.seed, learning_rate_factor=factor
                    )
                except TrainingDiverged:
                    accuracy = None
                else:
                    accuracy = measure.file(tuned, config, "int8")[0]
                seconds = time.perf_counter() - tick
                row["aware"][str(factor)] = {"accuracy": accuracy, "seconds": seconds}
                shown = "diverged" if accuracy is None else points(accuracy, base)
                print(f"  {path.stem}: factor {factor}: {shown} in {seconds:.0f} s", flush=True)
            rows.append(row)
            print(f"  {path.stem}: fp32 {base:.2%}, post-training {points(post, base)}", flush=True)

    command = shlex.join(["python", "bench/quantization_aware_rate.py", *sys.argv[1:]])
    lines = table(rows, args.factors)
    print("\n".join(lines))
    if args.results:
        text = [
            heading, "",
            "Test accuracy of each int8 file in onnxruntime, in points against the fp32 torch "
            "model; each quantization-aware column is the fine-tune at that factor times the "
            "pruning fine-tune's peak learning rate (today's factor: "
            f"{QUANTIZATION_AWARE_LEARNING_RATE_FACTOR}), with its seconds.", "",
            *lines, "", f"`{command}`", "",
        ]  # fmt: skip
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text("\n".join(text))
        args.results.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"written: {args.results}")


def largest_batchnorm_scale(model: torch.nn.Module) -> float:
    """The largest factor a batch norm multiplies its convolution's outputs by: the
    fine-tune fixes these scales, so the folded weights of a channel move this many times
    (squared) faster than the weights it trains."""
    norms = [pair[1] for pair in conv_norm_pairs(model).values()]
    return max(float((n.weight / torch.sqrt(n.running_var + n.eps)).abs().max()) for n in norms)


def table(rows: list[dict], factors: list[float]) -> list[str]:
    header = "| network | epochs | largest batch-norm scale | fp32 (torch) | int8 post-training"
    header += "".join(f" | QAT x{factor}" for factor in factors)
    lines = [header + " |", "|---" * (5 + len(factors)) + "|"]
    for r in rows:
        cells = []
        for factor in factors:
            aware = r["aware"][str(factor)]
            shown = (
                "diverged" if aware["accuracy"] is None else points(aware["accuracy"], r["torch"])
            )
            cells.append(f"{shown} ({aware['seconds']:.0f} s)")
        lines.append(
            f"| {r['network']} | {r['epochs']} | {r['largest_scale']:.2f} | {r['torch']:.2%} "
            f"| {points(r['post_training'], r['torch'])}" + "".join(f" | {c}" for c in cells) + " |"
        )
    return lines


if __name__ == "__main__":
    main()
