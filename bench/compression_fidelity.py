"""Compression fidelity: what fp16, int8 and pruning cost, measured on the deployed files.

Trains each of several architectures from the search space with a trial's FixRes
schedule (no pruning), then measures on the official test split, every accuracy from an
ONNX file run in onnxruntime and every size from the file's bytes:

- precision: fp32, fp16, int8 post-training (static, per-channel weights, calibrated on
  training images) and int8 after the trial's quantization-aware fine-tune (run on every
  model here, timed against the training), the int8 file a trial would keep; the change
  against the torch fp32 model and each file's size against the fp32 file;
- pruning to 30, 50 and 70% fewer parameters (`--fractions`, `--criterion`, `--scope`):
  without a fine-tune (batch-norm statistics re-estimated only) and with the trial's
  fine-tune at the test resolution (as long as pruning stretches it in a trial,
  `TrialConfig.finetune_epochs`); that fine-tuned model then in int8 (post-training,
  or quantization-aware where post-training loses more than the trial's threshold),
  with its size against the unpruned fp32 file;
- a control: the unpruned model fine-tuned as long as the most pruned one was, whose
  gain is what the extra epochs give without pruning;
- with `--criteria`, every criterion and scope at 50%, fine-tuned, in fp32;
- with `--alignment 8`, pruned widths rounded down to multiples of 8 (a trial leaves
  them as pruned: README, "Compression").

    python bench/compression_fidelity.py                   # MNIST from ../shared/data
    python bench/compression_fidelity.py --subset 10000 --epochs 6 --criteria
    python bench/compression_fidelity.py --dataset folder:../shared/data/cifar10-jpeg \
        --subset 20000 --epochs 12 --fractions 0.5 0.7 \
        --results bench/results/compression_fidelity_cifar10.md
    # CIFAR-10 networks trained past 80%, one run per network, rows kept in one file:
    python bench/compression_fidelity.py --dataset folder:../shared/data/cifar10-jpeg \
        --subset 0 --validation-share 0.02 --no-control --models 'resnet 16-32-64 x1' \
        --epochs 24 --fractions 0.65 --results bench/results/compression_fidelity_cifar10_80.md \
        --append --save-models /tmp/compression-models
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import itertools
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from cifar10_300kb import machine  # bench/, beside this script

from compsearch.objectives.catalog import CACHE_FOLDER, DISTILL_TEMPERATURE, DISTILL_WEIGHT
from compsearch.objectives.compress import prune
from compsearch.objectives.data import Dataset, load_dataset
from compsearch.objectives.measure import count_params, file_size_kb
from compsearch.objectives.modelfile import load_model, save_model
from compsearch.objectives.teacher import residual_arch
from compsearch.objectives.train import (
    DeviceData,
    Distillation,
    TrainingDiverged,
    accuracy,
    fit,
    predict,
    recalibrate_batchnorm,
)
from compsearch.objectives.trial import (
    QUANTIZATION_AWARE_THRESHOLD,
    deploy,
    finetune_phase,
    lost_too_much,
    quantization_aware_copy,
    taylor_loss,
    train_model,
)
from compsearch.search.loop import default_schedule
from compsearch.spaces import blocks
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
    """Networks of the search space: the five of the MNIST table (38k to 0.3M parameters,
    four block types), then larger ones that reach 80% on CIFAR-10 in a short schedule,
    with squeeze-and-excitation, hardswish and SiLU among them."""

    def network(stem: int, stages: list[tuple], activation: str = "relu") -> ArchConfig:
        built, in_width = [], stem
        for block, depth, width, stride, expansion, groups, squeeze in stages:
            built.append(
                make_stage(block, depth, in_width, width, 3, stride, expansion, groups, squeeze)
            )
            in_width = width
        return ArchConfig(channels, classes, stem, 3, activation, 0.01, tuple(built))

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
        "basic+se hardswish 24-48-96": network(
            24,
            [
                ("basic", 1, 24, 1, 1, 1, True),
                ("basic", 1, 48, 2, 1, 1, True),
                ("basic", 1, 96, 2, 1, 1, True),
            ],
            "hardswish",
        ),
        "grouped silu 32-64-128 x1/2/2": network(
            32,
            [
                ("grouped", 1, 32, 1, 1, 4, False),
                ("grouped", 2, 64, 2, 1, 4, False),
                ("grouped", 2, 128, 2, 1, 4, False),
            ],
            "silu",
        ),
        "plain silu 24-48-96 x2": network(
            24,
            [
                ("plain", 2, 24, 1, 1, 1, False),
                ("plain", 2, 48, 2, 1, 1, False),
                ("plain", 2, 96, 2, 1, 1, False),
            ],
            "silu",
        ),
        "dwsep silu 64-128-128 x1/2/2": network(
            64,
            [
                ("dwsep", 1, 64, 1, 1, 1, False),
                ("dwsep", 2, 128, 2, 1, 1, False),
                ("dwsep", 2, 128, 2, 1, 1, False),
            ],
            "silu",
        ),
        "inverted+se silu 16-32-64 x1/2/2": network(
            16,
            [
                ("inverted", 1, 16, 1, 4, 1, False),
                ("inverted", 2, 32, 2, 4, 1, False),
                ("inverted", 2, 64, 2, 4, 1, True),
            ],
            "silu",
        ),
    }


# The five networks run when --models is not given (the larger ones only when named).
DEFAULT_MODELS = (
    "resnet 16-32-64 x1",
    "resnet 16-32-64 x3",
    "inverted+se 16-24-48",
    "dwsep 32-64-128",
    "grouped 32-64-96",
)


def model_path(models: Path, name: str, epochs: int, seed: int) -> Path:
    """Where a trained network is kept, for bench/int8_loss.py to take apart."""
    return models / f"{name.replace(' ', '_').replace('/', '-')}-{epochs}ep-seed{seed}.pt"


def bench_dataset(args: argparse.Namespace) -> Dataset:
    """The split `--dataset`, `--seed`, `--subset` and `--validation-share` ask for, its
    decoded images cached in the temporary folder between runs."""
    return load_dataset(
        args.dataset, seed=args.seed, subset=args.subset or None, data_dir=args.data_dir,
        val_fraction=args.validation_share,
        cache_folder=Path(tempfile.gettempdir()) / "compsearch-bench" / CACHE_FOLDER,
    )  # fmt: skip


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
    distil: bool = False,
) -> tuple[torch.nn.Module, int, float]:
    """A copy of `model` pruned as asked, fine-tuned as a trial does when `finetune` (for
    the epochs pruning stretches it to), batch-norm statistics re-estimated either way;
    with the fine-tune's epochs and seconds. With `distil`, the fine-tune also learns
    from `model` itself, unpruned (the loss a `--teacher` gives a trial)."""
    resolution = schedule.test_resolution
    copied = copy.deepcopy(model)
    example = torch.zeros(1, on_device.channels, resolution, resolution)
    compress = CompressConfig("fp32", fraction, criterion, scope)
    prune(copied, arch, compress, example, taylor_loss(on_device, resolution))
    epochs = TrialConfig(arch, schedule, compress).finetune_epochs if finetune else 0
    tick = time.perf_counter()
    teacher = (
        Distillation(model.eval(), DISTILL_WEIGHT, DISTILL_TEMPERATURE, resolution)
        if distil
        else None
    )
    if finetune:
        phase = finetune_phase(schedule, epochs=epochs)
        fit(copied, on_device, phase, generator(seed), distillation=teacher)
    seconds = time.perf_counter() - tick
    recalibrate_batchnorm(copied, on_device, resolution, schedule.batch_size)
    return copied.eval(), epochs, seconds


def fine_tuned_copy(
    model: torch.nn.Module, on_device: DeviceData, schedule: TrainConfig, seed: int, epochs: int
) -> torch.nn.Module:
    """A copy of `model`, unpruned, fine-tuned as a pruned one is for `epochs`: the control
    that says what the extra epochs give without pruning."""
    copied = copy.deepcopy(model)
    fit(copied, on_device, finetune_phase(schedule, epochs=epochs), generator(seed))
    recalibrate_batchnorm(copied, on_device, schedule.test_resolution, schedule.batch_size)
    return copied.eval()


def generator(seed: int) -> torch.Generator:
    """The fine-tune's draws: the same for every pruned copy and the control."""
    return torch.Generator().manual_seed(seed + 2)


def epochs(count: int) -> str:
    return f"{count} epoch" if count == 1 else f"{count} epochs"


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
    parser.add_argument(
        "--subset", type=int, default=20_000, help="training images (0: all the split holds)"
    )
    parser.add_argument(
        "--validation-share", type=float, default=0.2,
        help="share of the training set held out as validation (unused here but for the "
        "split; 0.02 trains on 49,000 CIFAR-10 images)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=6, help="a trial's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--criterion", default="l2", choices=PRUNE_CRITERIA)
    parser.add_argument(
        "--scope", nargs="+", default=["local"], choices=PRUNE_SCOPES,
        help="pruning scopes, each run at every fraction (--criteria uses the first)",
    )  # fmt: skip
    parser.add_argument(
        "--distil", action="store_true",
        help="also fine-tune each pruned copy distilled from the unpruned network",
    )  # fmt: skip
    parser.add_argument("--criteria", action="store_true", help="compare criteria at 50%")
    parser.add_argument("--models", nargs="+", help="names of architectures to run")
    parser.add_argument(
        "--fractions", type=float, nargs="+", default=FRACTIONS, help="shares of params pruned"
    )
    parser.add_argument(
        "--alignment", type=int, default=blocks.CHANNEL_ALIGNMENT,
        help="pruned widths are rounded down to multiples of this (1: not at all), "
        f"default {blocks.CHANNEL_ALIGNMENT} as in a trial",
    )  # fmt: skip
    parser.add_argument(
        "--no-control", action="store_true",
        help="skip the control (the unpruned model fine-tuned as long as the most pruned)",
    )  # fmt: skip
    parser.add_argument(
        "--save-models", type=Path, metavar="FOLDER",
        help="keep each trained network here (bench/int8_loss.py --models reads them); a "
        "network already there (same architecture, epochs and seed) is loaded, not trained",
    )  # fmt: skip
    parser.add_argument(
        "--results", type=Path, help="also write the tables to this .md file (and .json)"
    )
    parser.add_argument(
        "--append", action="store_true",
        help="keep the rows of other models already in --results' .json (each row says "
        "its own schedule, machine and command)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.append and not args.results:
        parser.error("--append needs --results")
    blocks.CHANNEL_ALIGNMENT = args.alignment  # read by aligned_width at every call

    started = time.perf_counter()
    data = bench_dataset(args)
    on_device = DeviceData(data, "cpu")
    resolution = data.resolution
    schedule = dataclasses.replace(
        default_schedule(args.epochs, resolution), train_resolution=max(8, resolution * 3 // 4)
    )
    heading = (
        f"{data.name}: {len(data.train):,} training images, {len(data.test):,} test images, "
        f"{resolution} px; {args.epochs} epochs ({schedule.finetune_epochs} at the test "
        f"resolution, the rest at {schedule.train_resolution} px), seed {args.seed}; torch "
        f"{torch.__version__}, autocast {on_device.autocast or 'none (fp32)'}; pruned widths "
        f"rounded down to multiples of {args.alignment}; machine: "
        f"{machine()}"
    )
    print(heading)
    print(
        "Accuracy changes are percentage points of test accuracy against the torch fp32 "
        "model before compression; int8 QAT is always run here, while a trial runs it only "
        f"when post-training int8 loses more than {100 * QUANTIZATION_AWARE_THRESHOLD:.1f}."
    )
    models = architectures(data.channels, data.num_classes)
    names = args.models or list(DEFAULT_MODELS)
    unknown = sorted(set(names) - set(models))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; known: {', '.join(models)}")
    command = shlex.join(["python", "bench/compression_fidelity.py", *sys.argv[1:]])
    setting = {
        "epochs": args.epochs,
        "train_images": len(data.train),
        "dataset": data.name,
        "machine": machine(),
        "command": command,
    }
    precision_rows, pruning_rows, criteria_rows = [], [], []
    if args.append and args.results.with_suffix(".json").exists():
        earlier = json.loads(args.results.with_suffix(".json").read_text())
        precision_rows = [r for r in earlier["precision"] if r["model"] not in names]
        pruning_rows = [r for r in earlier["pruning"] if r["model"] not in names]
    with tempfile.TemporaryDirectory() as folder:
        measure = Measure(data, on_device, Path(folder), args.seed)
        for name in names:
            arch = models[name]
            config = TrialConfig(arch, schedule, CompressConfig("fp32", 0.0))
            path = args.save_models and model_path(args.save_models, name, args.epochs, args.seed)
            saved = load_model(path, "saved model") if path and path.is_file() else None
            if saved is not None and saved.arch == arch:
                model = saved.model.to(memory_format=torch.channels_last).eval()
                train_seconds = float(saved.facts["train_seconds"])
                print(f"  {name}: loaded from {path}, trained there in {train_seconds:.0f} s")
            else:
                tick = time.perf_counter()
                model, trained = train_model(config, on_device, args.seed)
                train_seconds = time.perf_counter() - tick
                if path:
                    save_model(  # makes the folder
                        path, model, trained.arch, config, train_seconds=train_seconds,
                        seed=args.seed,
                    )  # fmt: skip
            base = measure.torch_accuracy(model, resolution)
            fp32, fp32_kb, _ = measure.file(model, config, "fp32")
            fp16, fp16_kb, _ = measure.file(model, config, "fp16")
            ptq, int8_kb, _ = measure.file(model, config, "int8")
            tick = time.perf_counter()
            try:  # the fine-tune a trial runs, sized as there
                tuned = quantization_aware_copy(model, on_device, schedule, args.seed)
            except TrainingDiverged:
                tuned = None
            aware_seconds = time.perf_counter() - tick
            qat = None if tuned is None else measure.file(tuned, config, "int8")[0]
            row = {
                "model": name,
                "params": count_params(model),
                "train_seconds": train_seconds,
                "torch": base,
                "fp32": fp32,
                "fp16": fp16,
                "int8": ptq,
                "aware": qat,
                "aware_seconds": aware_seconds,
                "kept": kept_int8(base, ptq, qat),
                "fp32_kb": fp32_kb,
                "fp16_kb": fp16_kb,
                "int8_kb": int8_kb,
                **setting,
            }
            precision_rows.append(row)
            print(
                f"  {name}: trained in {train_seconds:.0f} s, fp32 {base:.2%}, int8 "
                f"{ptq:.2%} / QAT {'diverged' if qat is None else f'{qat:.2%}'} in "
                f"{aware_seconds:.0f} s",
                flush=True,
            )

            if args.fractions and not args.no_control:
                longest = max(
                    TrialConfig(arch, schedule, CompressConfig("fp32", f)).finetune_epochs
                    for f in args.fractions
                )
                control = fine_tuned_copy(model, on_device, schedule, args.seed, longest)
                row["control"] = measure.file(control, config, "fp32")[0]
                row["control_epochs"] = longest
            pruned = functools.partial(pruned_copy, model, arch, on_device, schedule, args.seed)
            variants = [
                (scope, distil)
                for scope in args.scope
                for distil in (False, True)[: 1 + args.distil]
            ]
            bare_accuracy = {}  # by (scope, fraction): the same whether distilled or not
            for (scope, distil), fraction in itertools.product(variants, args.fractions):
                if (scope, fraction) not in bare_accuracy:
                    bare, _, _ = pruned(fraction, args.criterion, scope, finetune=False)
                    bare_accuracy[scope, fraction] = measure.file(bare, config, "fp32")[0]
                bare_acc = bare_accuracy[scope, fraction]
                tuned, tuned_epochs, seconds = pruned(
                    fraction, args.criterion, scope, finetune=True, distil=distil
                )
                tuned_acc, _, _ = measure.file(tuned, config, "fp32")
                reference = measure.torch_accuracy(tuned, resolution)
                small_acc, small_kb, small_qat = measure.file(tuned, config, "int8", reference)
                pruning_rows.append(
                    {
                        "model": name,
                        "method": f"{args.criterion} {scope}" + (", distilled" if distil else ""),
                        "asked": fraction,
                        "pruned": 1 - count_params(tuned) / count_params(model),
                        "torch": base,
                        "no_finetune": bare_acc,
                        "finetuned": tuned_acc,
                        "int8": small_acc,
                        "aware": small_qat,
                        "smaller": fp32_kb / small_kb,
                        "finetune_epochs": tuned_epochs,
                        "finetune_seconds": seconds,
                        "control": row.get("control"),
                        "control_epochs": row.get("control_epochs"),
                    }
                )
            if args.criteria:
                for criterion in PRUNE_CRITERIA:
                    for scope in PRUNE_SCOPES:
                        tuned, _, _ = pruned(0.5, criterion, scope, finetune=True)
                        tuned_acc, _, _ = measure.file(tuned, config, "fp32")
                        share = 1 - count_params(tuned) / count_params(model)
                        criteria_rows.append((name, criterion, scope, share, base, tuned_acc))
            if args.results:
                write_results(args, heading, precision_rows, pruning_rows)

    print()
    print("\n".join(precision_table(precision_rows)))
    print(f"\nPruning ({args.criterion}, {', '.join(args.scope)})")
    print("\n".join(pruning_table(pruning_rows, f"{args.criterion} {args.scope[0]}")))
    if criteria_rows:
        print("\nCriteria at 50% of the parameters, fine-tuned, fp32 file (change in points)")
        for name, criterion, scope, share, base, tuned in criteria_rows:
            print(f"{name:22} {criterion:>8} {scope:>6} {share:>6.1%} {points(tuned, base):>7}")
    print("\nSummary")
    print("\n".join(summary(precision_rows, pruning_rows, names)))
    if args.results:
        print(f"written: {args.results}")
    print(f"\n{time.perf_counter() - started:.0f} s in all")


def kept_int8(base: float, ptq: float, qat: float | None) -> float:
    """int8 as a trial deploys it: the quantization-aware file tried only when
    post-training loses more than the threshold, and the better file kept."""
    if qat is None or not lost_too_much(base, ptq):
        return ptq
    return max(ptq, qat)


def precision_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | params | epochs | train s | fp32 (torch) | fp32 file | fp16 "
        "| int8 post-training | int8 QAT | QAT s / train s | int8 kept | fp16 size | int8 size |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r["torch"]
        aware = "diverged" if r["aware"] is None else points(r["aware"], base)
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r.get('epochs', '')} "
            f"| {r['train_seconds']:.0f} | {base:.2%} "
            f"| {points(r['fp32'], base)} | {points(r['fp16'], base)} "
            f"| {points(r['int8'], base)} | {aware} "
            f"| {r['aware_seconds']:.0f} / {r['train_seconds']:.0f} = "
            f"{r['aware_seconds'] / r['train_seconds']:.2f} | {points(r['kept'], base)} "
            f"| {r['fp16_kb'] / r['fp32_kb']:.3f} | {r['int8_kb'] / r['fp32_kb']:.3f} |"
        )
    return lines


def pruning_table(rows: list[dict], method: str) -> list[str]:
    """Each model's pruned rows after its control row (unpruned, fine-tuned as long as the
    most pruned one was); `method` names the pruning of rows that do not name their own."""
    lines = [
        "| model | pruning | asked | pruned | fine-tune | no fine-tune | fine-tuned | + int8 "
        "| smaller |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    model = None
    for r in rows:
        base = r["torch"]
        if r["model"] != model and r.get("control") is not None:
            lines.append(
                f"| {r['model']} | | control | 0.0% | {epochs(r['control_epochs'])} "
                f"| | {points(r['control'], base)} | | 1.0x |"
            )
        model = r["model"]
        lines.append(
            f"| {r['model']} | {r.get('method', method)} | {r['asked']:.0%} | {r['pruned']:.1%} "
            f"| {epochs(r['finetune_epochs'])}, {r['finetune_seconds']:.0f} s "
            f"| {points(r['no_finetune'], base)} | {points(r['finetuned'], base)} "
            f"| {points(r['int8'], base)}{' QAT' if r['aware'] else ''} "
            f"| {r['smaller']:.1f}x |"
        )
    return lines


def summary(precision_rows: list[dict], pruning_rows: list[dict], names: list[str]) -> list[str]:
    def line(label: str, key: str) -> str:
        changes = [100 * (r[key] - r["torch"]) for r in precision_rows if r[key] is not None]
        if not changes:
            return f"- {label}: none measured"
        return (
            f"- {label}: mean {statistics.mean(changes):+.2f}, worst {min(changes):+.2f} "
            f"points over {len(changes)} models"
        )

    lines = [
        line("fp16", "fp16"),
        line("int8 post-training", "int8"),
        line("int8 quantization-aware", "aware"),
        line("int8 as a trial keeps it", "kept"),
    ]
    diverged = sum(r["aware"] is None for r in precision_rows)
    shares = [r["aware_seconds"] / r["train_seconds"] for r in precision_rows]
    if shares:
        lines.append(
            f"- quantization-aware fine-tune: {diverged} of {len(shares)} diverged; its "
            f"seconds over the training's: at most {max(shares):.2f}"
        )
    for within in (0.5, 1.0):
        for name in names:
            rows = [
                r for r in pruning_rows
                if r["model"] == name and 100 * (r["int8"] - r["torch"]) >= -within
            ]  # fmt: skip
            if rows:
                top = max(rows, key=lambda r: r["smaller"])
                how = f", {top['method']}" if "method" in top else ""
                lines.append(
                    f"- pruning + int8 within {within} points, {name}: {top['smaller']:.1f}x "
                    f"smaller than unpruned fp32 at {points(top['int8'], top['torch'])} "
                    f"({top['asked']:.0%} asked{how})"
                )
            else:
                lines.append(f"- pruning + int8 within {within} points, {name}: none")
    return lines


def write_results(
    args: argparse.Namespace, heading: str, precision_rows: list[dict], pruning_rows: list[dict]
) -> None:
    """The tables as Markdown and the rows as JSON; with --append the rows of earlier runs
    stay, and the heading is this run's."""
    runs = {}  # each run's setting, in the order its rows come
    for r in precision_rows:
        if "command" in r:
            runs.setdefault(r["command"], (r, []))[1].append(r["model"])
    settings = [
        f"- {', '.join(models)}: {r['dataset']}, {r['train_images']:,} training images, "
        f"{r['epochs']} epochs; {r['machine']}; `{command}`"
        for command, (r, models) in runs.items()
    ]
    text = [
        heading,
        "",
        "Every accuracy is the test accuracy of an ONNX file in onnxruntime except `fp32 "
        "(torch)`; changes are points against it. `int8 QAT` is the trial's "
        "quantization-aware fine-tune, run here on every model; `int8 kept` is the file a "
        "trial keeps (the fine-tune only when post-training loses more than "
        f"{100 * QUANTIZATION_AWARE_THRESHOLD:.1f} points). Sizes are against the fp32 file.",
        "",
        *precision_table(precision_rows),
        "",
        f"Pruning ({args.criterion}, {', '.join(args.scope)}), fine-tuned as a trial does (for "
        "the epochs pruning stretches its fine-tune to; `distilled`: with the unpruned "
        "network as its teacher), then int8 as a trial keeps it (QAT: "
        "the quantization-aware file was kept); `smaller` is the unpruned fp32 file's bytes "
        "over the pruned int8 file's. Each `control` row is the unpruned model fine-tuned as "
        "long as the most pruned one, as an fp32 file: what the extra epochs give alone.",
        "",
        *pruning_table(pruning_rows, f"{args.criterion} {args.scope[0]}"),
        "",
        *summary(precision_rows, pruning_rows, [r["model"] for r in precision_rows]),
        "",
        "Each row's run (one run per command; rows of one run compare with each other):",
        "",
        *settings,
        "",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(text))
    both = {"precision": precision_rows, "pruning": pruning_rows}
    args.results.with_suffix(".json").write_text(json.dumps(both, indent=1) + "\n")


if __name__ == "__main__":
    main()
