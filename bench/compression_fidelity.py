"""Compression fidelity: what fp16, int8 and pruning cost, measured on the deployed files.

Trains each of several architectures from the search space with a trial's FixRes
schedule (no pruning), then measures on the official test split, every accuracy from an
ONNX file run in onnxruntime and every size from the file's bytes:

- precision: fp32, fp16, int8 post-training (static, per-channel weights, calibrated on
  training images) and int8 after a quantization-aware fine-tune; the change against
  the torch fp32 model and each file's size against the fp32 file;
- pruning to 30, 50 and 70% fewer parameters (`--criterion`, `--scope`): without a
  fine-tune (batch-norm statistics re-estimated only) and with the trial's fine-tune at
  the test resolution; that fine-tuned model then in int8 (post-training, or
  quantization-aware where post-training loses more than the trial's threshold), with
  its size against the unpruned fp32 file;
- with `--criteria`, every criterion and scope at 50%, fine-tuned, in fp32.

    python bench/compression_fidelity.py                   # MNIST from ../shared/data
    python bench/compression_fidelity.py --subset 10000 --epochs 6 --criteria
    python bench/compression_fidelity.py --dataset folder:../shared/data/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from compsearch.objectives.compress import prune
from compsearch.objectives.data import Dataset, load_dataset
from compsearch.objectives.measure import count_params, file_size_kb
from compsearch.objectives.quantize import quantization_aware_finetune
from compsearch.objectives.teacher import residual_arch
from compsearch.objectives.train import (
    DeviceData,
    accuracy,
    fit,
    predict,
    recalibrate_batchnorm,
)
from compsearch.objectives.trial import (
    QUANTIZATION_AWARE_LEARNING_RATE_FACTOR,
    QUANTIZATION_AWARE_THRESHOLD,
    deploy,
    finetune_phase,
    taylor_loss,
    train_model,
)
from compsearch.search.loop import default_schedule
from compsearch.spaces.config import (
    PRUNE_CRITERIA,
    PRUNE_SCOPES,
    ArchConfig,
    CompressConfig,
    TrainConfig,
    TrialConfig,
)
from compsearch.spaces.space import make_stage

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FRACTIONS = (0.3, 0.5, 0.7)  # shares of the parameters pruned


def architectures(channels: int, classes: int) -> dict[str, ArchConfig]:
    """Five networks of the search space, from 20k to 0.3M parameters, four block types."""

    def network(stem: int, stages: list[tuple]) -> ArchConfig:
        built, in_width = [], stem
        for block, depth, width, stride, expansion, groups, squeeze in stages:
            built.append(
                make_stage(block, depth, in_width, width, 3, stride, expansion, groups, squeeze)
            )
            in_width = width
        return ArchConfig(channels, classes, stem, 3, "relu", 0.01, tuple(built))

    return {
        "resnet 16-32-64 x1": residual_arch(channels, classes, (16, 32, 64), 1),
        "resnet 16-32-64 x3": residual_arch(channels, classes, (16, 32, 64), 3),
        "inverted+se 16-24-48": network(
            16,
            [
                ("inverted", 1, 16, 1, 4, 1, False),
                ("inverted", 2, 24, 2, 4, 1, True),
                ("inverted", 2, 48, 2, 4, 1, True),
            ],
        ),
        "dwsep 32-64-128": network(
            32,
            [
                ("dwsep", 1, 32, 1, 1, 1, False),
                ("dwsep", 2, 64, 2, 1, 1, False),
                ("dwsep", 2, 128, 2, 1, 1, False),
            ],
        ),
        "grouped 32-64-96": network(
            24,
            [
                ("grouped", 1, 32, 1, 1, 4, False),
                ("grouped", 1, 64, 2, 1, 4, False),
                ("grouped", 1, 96, 2, 1, 4, False),
            ],
        ),
    }


def pruned_copy(
    model: torch.nn.Module,
    arch: ArchConfig,
    on_device: DeviceData,
    schedule: TrainConfig,
    seed: int,
    fraction: float,
    criterion: str,
    scope: str,
    finetune: bool,
) -> torch.nn.Module:
    """A copy of `model` pruned as asked, fine-tuned as a trial does when `finetune`,
    batch-norm statistics re-estimated either way."""
    resolution = schedule.test_resolution
    copied = copy.deepcopy(model)
    example = torch.zeros(1, on_device.channels, resolution, resolution)
    compress = CompressConfig("fp32", fraction, criterion, scope)
    prune(copied, arch, compress, example, taylor_loss(on_device, resolution))
    if finetune:
        fit(copied, on_device, finetune_phase(schedule), torch.Generator().manual_seed(seed + 2))
    recalibrate_batchnorm(copied, on_device, resolution, schedule.batch_size)
    return copied.eval()


def points(after: float, before: float) -> str:
    return f"{100 * (after - before):+.2f}"


class Measure:
    """Files in one folder, each exported through the trial's own `deploy`."""

    def __init__(self, data: Dataset, on_device: DeviceData, folder: Path, seed: int) -> None:
        self.data, self.on_device, self.folder, self.seed = data, on_device, folder, seed

    def torch_accuracy(self, model: torch.nn.Module, resolution: int) -> float:
        split = self.data.test
        return accuracy(predict(model, split, self.on_device, resolution), split.labels)

    def file(
        self,
        model: torch.nn.Module,
        config: TrialConfig,
        precision: str,
        accuracy_torch: float | None = None,
    ) -> tuple[float, float, bool]:
        """(test accuracy, size_kb, quantization-aware) of `model`'s file at `precision`.
        Given `accuracy_torch`, an int8 file is deployed as a trial deploys it (a
        quantization-aware fine-tune tried when post-training int8 loses too much)."""
        compress = dataclasses.replace(config.compress, precision=precision)
        config = dataclasses.replace(config, compress=compress)
        path = self.folder / f"{precision}.onnx"
        reference = -1.0 if accuracy_torch is None else accuracy_torch  # -1: never tune
        deployed = deploy(
            model, config, self.data, self.on_device, path, self.data.test, self.seed, reference
        )
        return deployed.accuracy, file_size_kb(path), deployed.quantization_aware


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", type=Path, default=SHARED)
    parser.add_argument("--subset", type=int, default=20_000, help="training images")
    parser.add_argument("--epochs", type=int, default=6, help="a trial's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--criterion", default="l2", choices=PRUNE_CRITERIA)
    parser.add_argument("--scope", default="local", choices=PRUNE_SCOPES)
    parser.add_argument("--criteria", action="store_true", help="compare criteria at 50%")
    parser.add_argument("--models", nargs="+", help="names of architectures to run")
    args = parser.parse_args()

    started = time.perf_counter()
    data = load_dataset(args.dataset, seed=args.seed, subset=args.subset, data_dir=args.data_dir)
    on_device = DeviceData(data, "cpu")
    resolution = data.resolution
    schedule = dataclasses.replace(
        default_schedule(args.epochs, resolution), train_resolution=max(8, resolution * 3 // 4)
    )
    print(
        f"{data.name}: {len(data.train)} training images, {len(data.test)} test images, "
        f"{resolution} px; {args.epochs} epochs ({schedule.finetune_epochs} at the test "
        f"resolution, the rest at {schedule.train_resolution} px); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}, autocast "
        f"{on_device.autocast or 'none (fp32)'}"
    )
    print(
        "Accuracy changes are percentage points of test accuracy against the torch fp32 "
        "model before compression; int8 QAT is always run here, while a trial runs it only "
        f"when post-training int8 loses more than {100 * QUANTIZATION_AWARE_THRESHOLD:.1f}."
    )
    models = architectures(data.channels, data.num_classes)
    names = args.models or list(models)
    precision_rows, pruning_rows, criteria_rows = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        measure = Measure(data, on_device, Path(folder), args.seed)
        for name in names:
            arch = models[name]
            config = TrialConfig(arch, schedule, CompressConfig("fp32", 0.0))
            tick = time.perf_counter()
            model, _ = train_model(config, on_device, args.seed)
            base = measure.torch_accuracy(model, resolution)
            fp32, fp32_kb, _ = measure.file(model, config, "fp32")
            fp16, fp16_kb, _ = measure.file(model, config, "fp16")
            ptq, int8_kb, _ = measure.file(model, config, "int8")
            phase = finetune_phase(schedule, QUANTIZATION_AWARE_LEARNING_RATE_FACTOR)
            generator = torch.Generator().manual_seed(args.seed + 1)
            tuned = quantization_aware_finetune(model, on_device, phase, generator)
            qat, _, _ = measure.file(tuned, config, "int8")
            precision_rows.append(
                (name, count_params(model), base, fp32, fp16, ptq, qat, fp32_kb, fp16_kb, int8_kb)
            )
            print(
                f"  {name}: trained in {time.perf_counter() - tick:.0f} s, "
                f"fp32 {base:.2%}, int8 {ptq:.2%} / QAT {qat:.2%}",
                flush=True,
            )

            pruned = functools.partial(pruned_copy, model, arch, on_device, schedule, args.seed)
            for fraction in FRACTIONS:
                bare = pruned(fraction, args.criterion, args.scope, finetune=False)
                tuned = pruned(fraction, args.criterion, args.scope, finetune=True)
                bare_acc, _, _ = measure.file(bare, config, "fp32")
                tuned_acc, _, _ = measure.file(tuned, config, "fp32")
                reference = measure.torch_accuracy(tuned, resolution)
                small_acc, small_kb, small_qat = measure.file(tuned, config, "int8", reference)
                pruning_rows.append(
                    (
                        name,
                        fraction,
                        1 - count_params(tuned) / count_params(model),
                        base,
                        bare_acc,
                        tuned_acc,
                        small_acc,
                        small_qat,
                        fp32_kb / small_kb,
                    )
                )
            if args.criteria:
                for criterion in PRUNE_CRITERIA:
                    for scope in PRUNE_SCOPES:
                        tuned = pruned(0.5, criterion, scope, finetune=True)
                        tuned_acc, _, _ = measure.file(tuned, config, "fp32")
                        share = 1 - count_params(tuned) / count_params(model)
                        criteria_rows.append((name, criterion, scope, share, base, tuned_acc))

    print("\nPrecision (accuracy change in points; size against the fp32 file)")
    print(
        f"{'model':22} {'params':>8} {'fp32 torch':>10} {'onnx fp32':>9} {'fp16':>7} "
        f"{'int8 PTQ':>8} {'int8 QAT':>8} {'fp32 KB':>8} {'fp16':>6} {'int8':>6}"
    )
    for name, params, base, fp32, fp16, ptq, qat, fp32_kb, fp16_kb, int8_kb in precision_rows:
        print(
            f"{name:22} {params:>8,} {base:>10.2%} {points(fp32, base):>9} "
            f"{points(fp16, base):>7} {points(ptq, base):>8} {points(qat, base):>8} "
            f"{fp32_kb:>8.1f} {fp16_kb / fp32_kb:>6.3f} {int8_kb / fp32_kb:>6.3f}"
        )
    print(
        f"\nPruning ({args.criterion}, {args.scope}; accuracy change in points; the last "
        "column: unpruned fp32 file / pruned int8 file)"
    )
    print(
        f"{'model':22} {'asked':>5} {'pruned':>6} {'no fine-tune':>12} {'fine-tuned':>10} "
        f"{'+ int8':>7} {'smaller':>8}"
    )
    for name, fraction, share, base, bare, tuned, small, small_qat, ratio in pruning_rows:
        marker = " QAT" if small_qat else ""
        print(
            f"{name:22} {fraction:>5.0%} {share:>6.1%} {points(bare, base):>12} "
            f"{points(tuned, base):>10} {points(small, base):>7} {ratio:>7.1f}x{marker}"
        )
    if criteria_rows:
        print("\nCriteria at 50% of the parameters, fine-tuned, fp32 file (change in points)")
        for name, criterion, scope, share, base, tuned in criteria_rows:
            print(f"{name:22} {criterion:>8} {scope:>6} {share:>6.1%} {points(tuned, base):>7}")

    def summary(label: str, changes: list[float]) -> None:
        print(
            f"  {label}: mean {statistics.mean(changes):+.2f}, worst {min(changes):+.2f} "
            f"points over {len(changes)} models"
        )

    print("\nSummary")
    summary("fp16", [100 * (r[4] - r[2]) for r in precision_rows])
    summary("int8 post-training", [100 * (r[5] - r[2]) for r in precision_rows])
    summary("int8 quantization-aware", [100 * (r[6] - r[2]) for r in precision_rows])

    def deployed(row: tuple) -> float:
        """int8 as a trial deploys it: QAT tried only when post-training loses too much,
        and the better file kept."""
        base, ptq, qat = row[2], row[5], row[6]
        return max(ptq, qat) if base - ptq > QUANTIZATION_AWARE_THRESHOLD else ptq

    summary("int8 as a trial deploys it", [100 * (deployed(r) - r[2]) for r in precision_rows])
    good = [r for r in pruning_rows if 100 * (r[6] - r[3]) >= -0.5]
    best = max(good, key=lambda r: r[8], default=None)
    if best is not None:
        print(
            f"  pruning + int8: {best[8]:.1f}x smaller than unpruned fp32 for "
            f"{points(best[6], best[3])} points ({best[0]}, {best[1]:.0%} pruned)"
        )
    for name in names:
        rows = [r for r in good if r[0] == name]
        if rows:
            top = max(rows, key=lambda r: r[8])
            print(f"    {name}: {top[8]:.1f}x at {points(top[6], top[3])} points")
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
