"""Time to 94%: compsearch's trainer on airbench94's network, against airbench94 itself.

airbench94 (Keller Jordan's CIFAR-10 speed benchmark) trains a small VGG-like network to
94% test accuracy in a few seconds with its own tricks: a frozen patch-whitening first
layer, Lookahead, frozen batch-norm scales, a raised learning rate for biases,
alternating flips, and test-time augmentation. Here the same network, written from its
published description, is trained by our trainer (`objectives.train.fit`: whole-tensor
data on the device, batch augmentation there, bf16 autocast on CUDA, one-cycle Nesterov
SGD, label smoothing, then the fine-tune phase at the test resolution and batch-norm
recalibration, as `trial.train_model` does for the networks it builds), with none of
those tricks: a comparison of trainers on one network, not a reproduction.

The network: a 2x2 convolution to 24 channels (with bias, no padding) and GELU; three
groups of conv3x3, 2x2 max pool, batch norm, GELU, conv3x3, batch norm, GELU, 64, 256 and
256 channels wide; a global max pool; a linear layer (no bias) whose output is scaled by
1/9. About 1.97M parameters.

Timed and measured as bench/gpu_time_to_accuracy.py does: the whole training split, an
untimed warm-up, one run per epoch count, test accuracy in torch. Also reported: the test
accuracy with airbench's test-time augmentation (mirror, and one-pixel translations of the
mirrored pairs, weighted as airbench weighs them), since airbench's 94% includes it; and,
with --int8, the int8 ONNX file's accuracy in onnxruntime.

    python bench/airbench_network.py --dataset folder:.data/cifar10-jpeg --json out.json
    python bench/airbench_network.py --subset 500 --test-subset 200 --epochs 1 \\
        --device cpu --warmup-epochs 1 --int8                            # a toy check
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_time_to_accuracy import (
    add_common_arguments,
    device_description,
    full_training_data,
    say,
    schedule,
    summary,
    table,
    timed,
    write_json,
)
from torch import nn

from compsearch.objectives.compress import export
from compsearch.objectives.data import Dataset, Split
from compsearch.objectives.measure import (
    calibration_images,
    count_params,
    file_size_kb,
    onnx_accuracy,
)
from compsearch.objectives.train import (
    EVAL_BATCH_SIZE,
    DeviceData,
    Phase,
    accuracy,
    fit,
    predict,
    recalibrate_batchnorm,
)
from compsearch.objectives.trial import CALIBRATION_IMAGES, finetune_phase
from compsearch.spaces.config import TrainConfig

STEM_WIDTH = 24
WIDTHS = (64, 256, 256)
OUTPUT_SCALE = 1 / 9


class ConvPoolGroup(nn.Module):
    """conv3x3, 2x2 max pool, batch norm, GELU, conv3x3, batch norm, GELU."""

    def __init__(self, in_width: int, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_width, width, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(width),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AirbenchNetwork(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        stem_width: int = STEM_WIDTH,
        widths: tuple[int, ...] = WIDTHS,
        output_scale: float = OUTPUT_SCALE,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_width, 2, bias=True), nn.GELU())
        in_widths = (stem_width, *widths[:-1])
        pairs = zip(in_widths, widths, strict=True)
        self.groups = nn.Sequential(*(ConvPoolGroup(i, w) for i, w in pairs))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(widths[-1], num_classes, bias=False)
        self.output_scale = output_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.groups(self.stem(x)))
        return self.classifier(torch.flatten(x, 1)) * self.output_scale


def train_network(
    train: TrainConfig, data: DeviceData, seed: int, channels: int, classes: int
) -> nn.Module:
    """What `trial.train_model` does for a built config, on this network: the phase at the
    training resolution, the fine-tune at the test resolution, batch-norm recalibration."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = AirbenchNetwork(channels, classes).to(data.device)
    model = model.to(memory_format=torch.channels_last)
    first = Phase.of(train, train.train_resolution, train.epochs - train.finetune_epochs)
    fit(model, data, first, generator)
    if train.finetune_epochs > 0:
        fit(model, data, finetune_phase(train), generator)
    recalibrate_batchnorm(model, data, train.test_resolution, train.batch_size)
    return model


@torch.no_grad()
def predict_with_tta(model: nn.Module, split: Split, data: DeviceData) -> torch.Tensor:
    """Predicted classes with airbench's test-time augmentation (its level 2): the mean of
    the image's and its mirror's logits, averaged half and half with the same for the
    image shifted one pixel up-left and one pixel down-right (reflected borders)."""
    model.eval()

    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * model(x).float() + 0.5 * model(x.flip(-1)).float()

    out = []
    for start in range(0, len(split), EVAL_BATCH_SIZE):
        images = split.images[start : start + EVAL_BATCH_SIZE].to(data.device)
        x = data.inputs(images, data.resolution)
        side = x.shape[-1]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :side, :side], padded[..., 2:, 2:]]
        logits = 0.5 * mirrored(x) + 0.25 * sum(mirrored(s.contiguous()) for s in shifted)
        out.append(logits.argmax(1))
    return torch.cat(out)


def int8_accuracy(
    model: nn.Module, data: Dataset, path: Path, resolution: int, seed: int
) -> tuple[float, float]:
    """The project's int8 export of the model (post-training quantization): its accuracy
    on the test split in onnxruntime and its size in KB."""
    calibration = calibration_images(data, resolution, CALIBRATION_IMAGES, seed)
    export(copy.deepcopy(model).cpu().eval(), "int8", resolution, data.channels, path, calibration)
    return onnx_accuracy(path, data.test, data, resolution), file_size_kb(path)


COLUMNS = (
    ("epochs", "epochs", 6, "d"),
    ("train_seconds", "train s", 8, ".1f"),
    ("images_per_second", "img/s", 8, ",.0f"),
    ("torch_test_accuracy", "torch acc", 9, ".2%"),
    ("tta_test_accuracy", "tta acc", 8, ".2%"),
    ("int8_test_accuracy", "int8 acc", 8, ".2%"),
    ("size_kb", "int8 KB", 8, ".1f"),
    ("params", "params", 10, ","),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, epochs=[10, 20, 30, 40])
    parser.add_argument(
        "--target", type=float, nargs="+", default=[0.93, 0.94], help="test accuracies to reach"
    )
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=0.4, help="peak, Nesterov SGD")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--cutout", type=int, default=0, help="pixels; 0: none (as airbench94)")
    parser.add_argument("--int8", action="store_true", help="also export and measure int8 ONNX")
    args = parser.parse_args()
    args.train_resolution = None  # the network needs 32 px: its last pool would be empty

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
    params = count_params(AirbenchNetwork(data.channels, data.num_classes))
    longest = schedule(args, max(args.epochs), data.resolution)
    say(f"airbench94's network: {params:,} params; schedule {dataclasses.asdict(longest)}")
    started = time.perf_counter()
    on_device = DeviceData(data, device)
    say(f"data on {device} in {time.perf_counter() - started:.1f} s")

    def train(epochs: int, seed: int) -> nn.Module:
        config = schedule(args, epochs, data.resolution)
        return train_network(config, on_device, seed, data.channels, data.num_classes)

    report: dict[str, Any] = {
        "figure": "time to accuracy, compsearch trainer on airbench94's network",
        "facts": facts,
        "dataset": data.name,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "params": params,
        "target": args.target,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="airbench-network-") as scratch:
        out = args.out or Path(scratch)
        if args.warmup_epochs > 0:
            model, seconds = timed(device, lambda: train(args.warmup_epochs, args.seed + 1000))
            predict(model, on_device.val, on_device, data.resolution)
            predict_with_tta(model, on_device.val, on_device)
            say(f"warm-up: {args.warmup_epochs} epochs in {seconds:.1f} s (untimed)")
        say(table([], COLUMNS))
        for epochs in args.epochs:
            model, seconds = timed(device, lambda: train(epochs, args.seed))  # noqa: B023
            test = on_device.val
            row: dict[str, Any] = {
                "epochs": epochs,
                "train_seconds": seconds,
                "images_per_second": epochs * len(data.train) / seconds,
                "torch_test_accuracy": accuracy(
                    predict(model, test, on_device, data.resolution), test.labels
                ),
                "tta_test_accuracy": accuracy(
                    predict_with_tta(model, test, on_device), test.labels
                ),
                "params": params,
                "schedule": dataclasses.asdict(schedule(args, epochs, data.resolution)),
            }
            if args.int8:
                path = out / f"airbench-epochs{epochs}.onnx"
                row["int8_test_accuracy"], row["size_kb"] = int8_accuracy(
                    model, data, path, data.resolution, args.seed
                )
            report["runs"].append(row)
            write_json(args.json, report)
            say(table([row], COLUMNS, head=False))
    say("")
    say(table(report["runs"], COLUMNS))
    keys = ("torch_test_accuracy", "tta_test_accuracy") + (("int8_test_accuracy",) * args.int8)
    lines = summary(report["runs"], args.target, keys)
    for line in lines:
        say(line)
    report["summary"] = lines
    write_json(args.json, report)


if __name__ == "__main__":
    main()
