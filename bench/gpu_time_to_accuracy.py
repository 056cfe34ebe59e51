"""Time to accuracy: how long compsearch's trainer takes to reach a CIFAR-10 test accuracy
with a model whose int8 ONNX file fits a size budget.

One config of our own search space (default: a ResNet-12 at twice ResNet-20's width,
263,658 params, about 282 KB as an int8 file by `spaces.estimate`) is trained from scratch
once per epoch count, by the trial pipeline's own `train_model` (the phase at the training
resolution, pruning, here none, the fine-tune at the test resolution, batch-norm
recalibration) on the whole official training split: all 50,000 images, no validation
hold-out, as time-to-accuracy figures for CIFAR-10 are usually measured. A trial holds out
a fifth for validation; here the figure is the official test split's accuracy, which no
choice below was tuned on. Then the project's own `deploy` writes the int8 ONNX file
(post-training quantization, a quantization-aware fine-tune when that loses more than 0.3
points) and onnxruntime measures it on the 10,000 test images.

Timed: `train_model` only, wall clock, the device synchronized before and after. The
images are decoded once (and cached by the folder loader) and put on the device once,
outside the timing, as a search does. An untimed warm-up run first loads the kernels and
lets cuDNN and the caching allocator settle.

    python bench/gpu_time_to_accuracy.py --dataset folder:.data/cifar10-jpeg --json out.json
    python bench/gpu_time_to_accuracy.py --subset 500 --test-subset 200 --epochs 1 2 \\
        --device cpu --warmup-epochs 1                                  # a toy check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compsearch.objectives.data import (
    Dataset,
    Split,
    channel_statistics,
    load_dataset,
    stratified_split,
)
from compsearch.objectives.measure import count_params, file_size_kb
from compsearch.objectives.teacher import residual_arch
from compsearch.objectives.train import DeviceData, accuracy, autocast_dtype, predict
from compsearch.objectives.trial import deploy, train_model
from compsearch.spaces.config import ArchConfig, CompressConfig, TrainConfig, TrialConfig
from compsearch.spaces.estimate import estimate

DEFAULT_DATASET = "folder:.data/cifar10-jpeg"

# name: (stage widths, blocks per stage); the stem is as wide as the first stage.
ARCHS = {
    # Default: 263,658 params, 78.1M MACs, ~282 KB int8 (estimate). Wider and shallower
    # than ResNet-20 for about the same parameters: twice its MACs, 11 convolutions
    # instead of 19, so fewer, larger kernels per step and more accuracy per epoch.
    "wide12": ((32, 64, 72), (2, 2, 1)),
    # ResNet-20's shape: 272,474 params, 40.8M MACs, ~296 KB int8: at the budget's edge.
    "resnet20": ((16, 32, 64), (3, 3, 3)),
    # 3 more convolutions than wide12, narrower middle: 258,698 params, 93.2M MACs, ~280 KB.
    "wide16": ((32, 48, 72), (3, 3, 1)),
}


def arch_config(name: str, channels: int, num_classes: int) -> ArchConfig:
    """A CIFAR-style ResNet from our space: basic blocks, 3x3 kernels, relu, stride 1 in
    the first stage and 2 in the others, a projection where the shape changes."""
    widths, depths = ARCHS[name]
    base = residual_arch(channels, num_classes, widths, 1)
    stages = []
    in_width = base.stem_width
    for stage, depth in zip(base.stages, depths, strict=True):
        stages.append(
            dataclasses.replace(
                stage,
                depth=depth,
                hidden_widths=(stage.width,) * depth,
                projection=stage.stride != 1 or in_width != stage.width,
            )
        )
        in_width = stage.width
    return dataclasses.replace(base, stages=tuple(stages))


def say(text: str) -> None:
    print(text, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stratified_head(split: Split, count: int | None, seed: int) -> Split:
    """`count` images of `split`, the same share of every class; all when None."""
    if count is None or count >= len(split):
        return split
    labels = split.labels.numpy()
    keep, _ = stratified_split(labels, 1 - count / len(split), seed)
    index = torch.from_numpy(keep)
    return Split(split.images[index].clone(), split.labels[index].clone())


def full_training_data(
    dataset: str, data_dir: Path, subset: int | None, test_subset: int | None, seed: int
) -> Dataset:
    """The dataset with the whole official training split to train on (the trial's
    training and validation parts joined) and the official test split as both `val` and
    `test`: `DeviceData` then holds the test images on the device, where `predict` is
    fastest. Mean and std are recomputed over the joined split."""
    data = load_dataset(dataset, seed=seed, data_dir=data_dir)
    joined = Split(
        torch.cat([data.train.images, data.val.images]),
        torch.cat([data.train.labels, data.val.labels]),
    )
    train = stratified_head(joined, subset, seed)
    test = stratified_head(data.test, test_subset, seed)
    mean, std = channel_statistics(train.images)
    return dataclasses.replace(data, train=train, val=test, test=test, mean=mean, std=std)


def device_description(device: torch.device) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "autocast": str(autocast_dtype(device) or "none (fp32)"),
    }
    if device.type == "cuda":
        facts["device_name"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
        facts["cudnn"] = torch.backends.cudnn.version()
        facts["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    else:
        facts["device_name"] = platform.processor() or platform.machine()
    try:
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return facts


# (key, title, width, format): one column of the table.
COLUMNS = (
    ("epochs", "epochs", 6, "d"),
    ("train_seconds", "train s", 8, ".1f"),
    ("images_per_second", "img/s", 8, ",.0f"),
    ("torch_test_accuracy", "torch acc", 9, ".2%"),
    ("int8_test_accuracy", "int8 acc", 8, ".2%"),
    ("size_kb", "int8 KB", 8, ".1f"),
    ("params", "params", 8, ","),
    ("deploy_seconds", "deploy s", 8, ".1f"),
    # Whether the file comes from the quantization-aware fine-tune (int8 acc is then that
    # file's; its fine-tune is in deploy s, not train s).
    ("quantization_aware", "QAT", 5, ""),
)


def table(rows: list[dict[str, Any]], columns=COLUMNS, head: bool = True) -> str:
    """The rows as aligned text, "-" where a row has no value."""
    lines = [" ".join(title.rjust(width) for _, title, width, _ in columns)] if head else []
    for row in rows:
        cells = []
        for key, _, width, spec in columns:
            value = row.get(key)
            if isinstance(value, bool):
                value = "yes" if value else "no"
            cells.append("-".rjust(width) if value is None else f"{value:>{width}{spec}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def first_reaching(rows: list[dict[str, Any]], key: str, target: float) -> dict[str, Any] | None:
    """The fastest run whose `key` accuracy is at least `target`."""
    reached = [r for r in rows if r.get(key) is not None and r[key] >= target]
    return min(reached, key=lambda r: r["train_seconds"]) if reached else None


def summary(rows: list[dict[str, Any]], targets: list[float], keys: tuple[str, ...]) -> list[str]:
    """For each accuracy and target, the training time of the fastest run reaching it."""
    lines = []
    for key, target in ((key, target) for target in targets for key in keys):
        best = first_reaching(rows, key, target)
        if best is None:
            top = max((r[key] for r in rows if r.get(key) is not None), default=None)
            shown = f"{top:.2%}" if top is not None else "-"
            lines.append(f"{key}: {target:.1%} not reached (best {shown})")
        else:
            lines.append(
                f"{key}: {target:.1%} reached in {best['train_seconds']:.1f} s of training "
                f"({best['epochs']} epochs, {best[key]:.2%})"
            )
    return lines


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(path)


def add_common_arguments(parser: argparse.ArgumentParser, epochs: list[int]) -> None:
    """The arguments (A) and (B) share."""
    parser.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help=f"a compsearch dataset (default {DEFAULT_DATASET})",
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--epochs", type=int, nargs="+", default=epochs, help="one run each")
    parser.add_argument("--warmup-epochs", type=int, default=2, help="untimed run first; 0: none")
    parser.add_argument("--subset", type=int, help="training images (default: all 50,000)")
    parser.add_argument("--test-subset", type=int, help="test images (default: all 10,000)")
    parser.add_argument(
        "--finetune-fraction",
        type=float,
        default=0.25,
        help="share of the epochs in the fine-tune at the test resolution (the search's "
        "default schedule: 0.25)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN time its algorithms (the project leaves it off)",
    )
    parser.add_argument("--json", type=Path, help="write the results here (rewritten per run)")
    parser.add_argument("--out", type=Path, help="folder for the ONNX files (default: temporary)")


def schedule(args: argparse.Namespace, epochs: int, resolution: int) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        finetune_epochs=max(1, round(epochs * args.finetune_fraction)) if epochs > 1 else 0,
        train_resolution=args.train_resolution or resolution,
        test_resolution=resolution,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        cutout=args.cutout,
    )


def timed(device: torch.device, work: Callable[[], Any]) -> tuple[Any, float]:
    synchronize(device)
    started = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, epochs=[10, 20, 40, 80])
    parser.add_argument(
        "--target", type=float, nargs="+", default=[0.93], help="test accuracies to reach"
    )
    parser.add_argument("--budget-kb", type=float, default=300.0, help="int8 file budget")
    parser.add_argument("--arch", choices=list(ARCHS), default="wide12")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=0.2, help="peak, Nesterov SGD")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--cutout", type=int, default=8, help="pixels; 0: none")
    parser.add_argument(
        "--train-resolution",
        type=int,
        help="pixels of the first phase (default: the test resolution; FixRes trials use less)",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    facts = device_description(device)
    say(" ".join(f"{k}={v}" for k, v in facts.items()))
    started = time.perf_counter()
    data = full_training_data(args.dataset, args.data_dir, args.subset, args.test_subset, args.seed)
    say(
        f"{data.name}: {len(data.train)} training and {len(data.test)} test images at "
        f"{data.resolution} px, read in {time.perf_counter() - started:.1f} s"
    )
    arch = arch_config(args.arch, data.channels, data.num_classes)

    def config(epochs: int) -> TrialConfig:
        return TrialConfig(arch, schedule(args, epochs, data.resolution), CompressConfig("int8", 0))

    guess = estimate(config(max(args.epochs)))
    say(
        f"config {args.arch}: widths {ARCHS[args.arch][0]}, blocks {ARCHS[args.arch][1]}; "
        f"estimate {guess.params:,} params, {guess.macs / 1e6:.1f}M MACs, "
        f"{guess.size_kb:.1f} KB int8 (budget {args.budget_kb:g} KB)"
    )
    if guess.size_kb > args.budget_kb:
        say(f"warning: the estimate is over the {args.budget_kb:g} KB budget")
    say(f"schedule: {dataclasses.asdict(config(max(args.epochs)).train)}")

    started = time.perf_counter()
    on_device = DeviceData(data, device)
    synchronize(device)
    say(f"data on {device} in {time.perf_counter() - started:.1f} s")

    report: dict[str, Any] = {
        "figure": "time to accuracy, compsearch trainer, int8 ONNX within budget",
        "facts": facts,
        "dataset": data.name,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "arch_name": args.arch,
        "arch": dataclasses.asdict(arch),
        "estimate": {"params": guess.params, "macs": guess.macs, "size_kb": guess.size_kb},
        "target": args.target,
        "budget_kb": args.budget_kb,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="time-to-accuracy-") as scratch:
        out = args.out or Path(scratch)
        if args.warmup_epochs > 0:
            warm = config(args.warmup_epochs)
            (model, trained), seconds = timed(
                device, lambda: train_model(warm, on_device, args.seed + 1000)
            )
            measured = accuracy(
                predict(model, on_device.val, on_device, data.resolution), on_device.val.labels
            )
            path = out / "warmup.onnx"
            deploy(model, trained, data, on_device, path, data.test, args.seed, measured)
            say(f"warm-up: {args.warmup_epochs} epochs in {seconds:.1f} s (untimed)")
        say(table([]))
        for epochs in args.epochs:
            row = run_once(config(epochs), data, on_device, device, out, args.seed)
            row["within_budget"] = row["size_kb"] <= args.budget_kb
            report["runs"].append(row)
            write_json(args.json, report)
            say(table([row], head=False))
    say("")
    say(table(report["runs"]))
    lines = summary(report["runs"], args.target, ("int8_test_accuracy", "torch_test_accuracy"))
    for line in lines:
        say(line)
    over = [r["epochs"] for r in report["runs"] if not r["within_budget"]]
    if over:
        say(f"over the {args.budget_kb:g} KB budget: runs of {over} epochs")
    report["summary"] = lines
    write_json(args.json, report)


def run_once(
    config: TrialConfig,
    data: Dataset,
    on_device: DeviceData,
    device: torch.device,
    out: Path,
    seed: int,
) -> dict[str, Any]:
    """Train `config` from scratch (timed), measure it in torch and as an int8 file."""
    epochs = config.train.epochs
    (model, trained), seconds = timed(device, lambda: train_model(config, on_device, seed))
    resolution = config.train.test_resolution
    torch_accuracy = accuracy(
        predict(model, on_device.val, on_device, resolution), on_device.val.labels
    )
    path = out / f"epochs{epochs}.onnx"
    deployed, deploy_seconds = timed(
        device,
        lambda: deploy(model, trained, data, on_device, path, data.test, seed, torch_accuracy),
    )
    return {
        "epochs": epochs,
        "train_seconds": seconds,
        "images_per_second": epochs * len(data.train) / seconds,
        "torch_test_accuracy": torch_accuracy,
        "int8_test_accuracy": deployed.accuracy,
        "int8_post_training_accuracy": deployed.accuracy_post_training,
        "quantization_aware": deployed.quantization_aware,
        "size_kb": file_size_kb(deployed.path),
        "params": count_params(deployed.model),
        "deploy_seconds": deploy_seconds,
        "schedule": dataclasses.asdict(trained.train),
    }


if __name__ == "__main__":
    main()
