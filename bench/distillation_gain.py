"""Distillation gain: a student's accuracy with and without the teacher, same schedule.

Each seed trains the same student twice, once from the labels alone and once with the
teacher's softened outputs, through the trial pipeline itself (FixRes, int8 ONNX export,
accuracy measured by onnxruntime on the validation split). The teacher is trained once,
as `--teacher auto` trains it, and cached under OUT.

    python bench/distillation_gain.py                 # CIFAR-10 (JPEG copy), 3 seeds
    python bench/distillation_gain.py --seeds 0 1 2 3 4 --teacher-widths 32 64 128
    python bench/distillation_gain.py --subset 5000 --epochs 6 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from compsearch.objectives import catalog
from compsearch.objectives import teacher as teacher_module
from compsearch.objectives.data import load_dataset
from compsearch.objectives.teacher import prepare_teacher, residual_arch
from compsearch.objectives.train import DeviceData
from compsearch.objectives.trial import run_trial
from compsearch.search.loop import default_schedule
from compsearch.spaces.config import CompressConfig, TrialConfig

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=f"folder:{SHARED_CIFAR}")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--subset", type=int, default=10_000, help="training images")
    parser.add_argument("--epochs", type=int, default=8, help="student epochs (teacher: 2x)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--student-widths", type=int, nargs="+", default=[16, 32, 48])
    parser.add_argument("--student-depth", type=int, default=1)
    parser.add_argument(
        "--teacher-widths",
        type=int,
        nargs="+",
        default=list(teacher_module.TEACHER_WIDTHS),
        help="stage widths of the teacher (default: --teacher auto's)",
    )
    parser.add_argument("--weight", type=float, default=catalog.DISTILL_WEIGHT)
    parser.add_argument("--temperature", type=float, default=catalog.DISTILL_TEMPERATURE)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-distillation"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    teacher_module.TEACHER_WIDTHS = tuple(args.teacher_widths)
    # The cached teacher's file name does not say its widths: one folder per teacher.
    out = args.out / ("teacher-" + "-".join(map(str, args.teacher_widths)))
    data = load_dataset(args.dataset, seed=0, subset=args.subset, data_dir=args.data_dir)
    on_device = DeviceData(data, args.device)
    schedule = default_schedule(args.epochs, data.resolution)
    started = time.perf_counter()
    distillation = prepare_teacher(
        "auto",
        data,
        on_device,
        out,
        schedule,
        seed=0,
        subset=args.subset,
        weight=args.weight,
        temperature=args.temperature,
        say=print,
    )
    print(f"teacher ready after {time.perf_counter() - started:.0f} s")
    arch = residual_arch(
        data.channels, data.num_classes, tuple(args.student_widths), args.student_depth
    )
    train = dataclasses.replace(schedule, train_resolution=max(8, data.resolution // 2))
    config = TrialConfig(arch, train, CompressConfig("int8", 0.0))
    student = "-".join(map(str, args.student_widths)) + f"x{args.student_depth}"
    print(
        f"{data.name}: {len(data.train)} train, {len(data.val)} validation images; student "
        f"widths {args.student_widths} x{args.student_depth}, {args.epochs} epochs "
        f"({train.train_resolution} px then {train.finetune_epochs} at {train.test_resolution}"
        f" px), int8; weight {args.weight}, temperature {args.temperature}"
    )
    # The int8 file's accuracy is what a user ships; the fp32 model's, before compression,
    # shows the teacher's effect on training without the noise quantization adds.
    print(
        f"{'seed':>4} {'labels only':>12} {'distilled':>10} {'gain':>7} "
        f"{'fp32 labels':>12} {'fp32 distilled':>15} {'fp32 gain':>10} {'size KB':>8} "
        f"{'labels s':>9} {'distilled s':>12}"
    )
    gains, fp32_gains, arms = [], [], {"labels only": [], "distilled": []}
    for seed in args.seeds:
        results = []
        for teacher in (None, distillation):
            arm = "distilled" if teacher else "labels"
            folder = out / f"student-{student}" / f"seed{seed}-{arm}"
            results.append(
                run_trial(config, data, folder, seed, on_device=on_device, distillation=teacher)
            )
        labels, distilled = results
        arms["labels only"].append(labels.accuracy)
        arms["distilled"].append(distilled.accuracy)
        gains.append(distilled.accuracy - labels.accuracy)
        fp32_gains.append(
            distilled.accuracy_before_compression - labels.accuracy_before_compression
        )
        print(
            f"{seed:>4} {labels.accuracy:>12.2%} {distilled.accuracy:>10.2%} "
            f"{gains[-1] * 100:>+6.2f} {labels.accuracy_before_compression:>12.2%} "
            f"{distilled.accuracy_before_compression:>15.2%} {fp32_gains[-1] * 100:>+9.2f} "
            f"{distilled.size_kb:>8.1f} {labels.seconds:>9.0f} {distilled.seconds:>12.0f}",
            flush=True,
        )
    summaries = [
        *((f"{arm}, int8 file", values, "", "%") for arm, values in arms.items()),
        ("gain, int8 file", gains, "+", " points"),
        ("gain, fp32 model", fp32_gains, "+", " points"),
    ]
    for name, values, sign, unit in summaries:
        spread = statistics.stdev(values) * 100 if len(values) > 1 else float("nan")
        print(
            f"{name}: {statistics.mean(values) * 100:{sign}.2f}{unit} ± {spread:.2f} over "
            f"{len(values)} seeds"
        )
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
