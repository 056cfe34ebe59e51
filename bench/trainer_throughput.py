"""Training images per second: compsearch's trainer against a conventional PyTorch pipeline.

Both train the same network on the same images with the same optimizer, loss and batch
size, for one epoch at each resolution:

- ours: `objectives.train.fit`, the whole dataset as uint8 tensors on the device, batch
  augmentation there, channels_last, bf16 autocast where the hardware has it;
- conventional: a `Dataset` that turns each image into a PIL image and applies per-image
  transforms (pad-and-crop, flip, resize for the low resolution, to tensor, normalize, as
  torchvision's transforms do), a `DataLoader`, an NCHW fp32 model. It is timed with 0 and
  with 2 worker processes and the faster counts.

"step alone" is the training step of our network (channels_last, our precision) repeated
on one fixed batch, with no data pipeline at all; "ceiling" is that rate over the faster
conventional one: no pipeline can beat the conventional one by more on this machine.
With `--compile`, "compiled" is the same step through `torch.compile` (after its
compilation, whose seconds are printed beside it): whether compiling would lift the ceiling.

    python bench/trainer_throughput.py                    # CIFAR-10 (JPEG copy) if present
    python bench/trainer_throughput.py --images 4096 --resolutions 16 32
    python bench/trainer_throughput.py --images 4096 --compile
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from compsearch.objectives.data import Dataset, Split, load_dataset
from compsearch.objectives.teacher import residual_arch
from compsearch.objectives.train import (
    MOMENTUM,
    DeviceData,
    Phase,
    Recipe,
    autocast_dtype,
    fit,
    translation_pad,
)
from compsearch.spaces.builder import build
from compsearch.spaces.config import ArchConfig

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
BATCH_SIZE = 64  # the default schedule's
LEARNING_RATE = 0.05
WEIGHT_DECAY = 5e-4
LABEL_SMOOTHING = 0.1
# Both pipelines translate by up to an eighth of the side, as the tables were measured.
TRANSLATION = 1 / 8


MODELS = {
    # ResNet-20's shape (CIFAR ResNet, 3 stages of 3 basic blocks): 0.27M params, about
    # 280 KB in int8: a model at the edge of a 300 KB budget.
    "resnet20": ((16, 32, 64), 3),
    # A network for a tight budget: 3 stages of 1 block, about 24k params.
    "small": ((16, 32, 48), 1),
}


class ConventionalImages(torch.utils.data.Dataset):
    """Per-image transforms on PIL images, as a torchvision pipeline does them."""

    def __init__(self, split: Split, data: Dataset, resolution: int) -> None:
        self.images = split.images.permute(0, 2, 3, 1).numpy()  # HWC, as CIFAR stores them
        self.labels = split.labels.numpy()
        self.mean = np.array(data.mean, dtype=np.float32)[:, None, None]
        self.std = np.array(data.std, dtype=np.float32)[:, None, None]
        self.side = data.resolution
        self.pad = translation_pad(data.resolution, TRANSLATION)
        self.flip = data.flip
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = self.images[index]
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        image = ImageOps.expand(image, border=self.pad, fill=0)  # RandomCrop(padding=pad)
        left, top = np.random.randint(0, 2 * self.pad + 1, size=2)
        image = image.crop((left, top, left + self.side, top + self.side))
        if self.flip and np.random.rand() < 0.5:  # RandomHorizontalFlip
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.resolution != self.side:  # Resize
            image = image.resize((self.resolution, self.resolution), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255  # ToTensor
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy((array - self.mean) / self.std), int(
            self.labels[index]
        )  # Normalize


def conventional_epoch(
    arch: ArchConfig, split: Split, data: Dataset, resolution: int, workers: int
) -> float:
    """Images per second of one epoch of the conventional pipeline (after a warm-up)."""
    torch.manual_seed(0)
    model = build(arch).train()  # NCHW, fp32
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=LEARNING_RATE,
        momentum=MOMENTUM,
        nesterov=True,
        weight_decay=WEIGHT_DECAY,
    )
    loader = torch.utils.data.DataLoader(
        ConventionalImages(split, data, resolution),
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )

    def epoch(limit: int | None) -> int:
        seen = 0
        for batch, (images, labels) in enumerate(loader):
            if limit is not None and batch == limit:
                break
            loss = F.cross_entropy(model(images), labels, label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        return seen

    epoch(limit=4)  # workers started, kernels chosen
    started = time.perf_counter()
    seen = epoch(limit=None)
    return seen / (time.perf_counter() - started)


def our_epoch(
    arch: ArchConfig, data: Dataset, device: str, resolution: int, bf16: bool = False
) -> float:
    """Images per second of one epoch of `fit` (after a warm-up on a few batches)."""
    torch.manual_seed(0)
    on_device = DeviceData(data, device)
    if bf16:  # forced, to measure it where the hardware has no bf16 units
        on_device.autocast = torch.bfloat16
    model = build(arch).to(device).to(memory_format=torch.channels_last)
    phase = Phase(
        resolution=resolution,
        epochs=1,
        peak_learning_rate=LEARNING_RATE,
        warmup_fraction=0.15,
        batch_size=BATCH_SIZE,
        weight_decay=WEIGHT_DECAY,
        label_smoothing=LABEL_SMOOTHING,
        recipe=Recipe(translation=TRANSLATION),
    )
    warm = DeviceData(dataclasses.replace(data, train=head(data.train, 4 * BATCH_SIZE)), device)
    fit(model, warm, phase, torch.Generator().manual_seed(0))
    if on_device.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fit(model, on_device, phase, torch.Generator().manual_seed(1))  # ends with a .item()
    return len(data.train) / (time.perf_counter() - started)


def step_alone(
    arch: ArchConfig, device: str, resolution: int, channels: int, compiled: bool = False
) -> tuple[float, float]:
    """Images per second of the training step on one fixed batch (no data pipeline at all):
    the ceiling of any pipeline for this network, precision and batch size here; and the
    seconds of the warm-up steps, which hold the compilation when `compiled`."""
    torch.manual_seed(0)
    model = build(arch).to(device).to(memory_format=torch.channels_last).train()
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, nesterov=True
    )
    images = torch.randn(BATCH_SIZE, channels, resolution, resolution, device=device)
    images = images.to(memory_format=torch.channels_last)
    labels = torch.arange(BATCH_SIZE, device=device) % arch.num_classes
    autocast = autocast_dtype(torch.device(device))

    def steps(count: int) -> None:
        for _ in range(count):
            with torch.autocast(
                torch.device(device).type,
                dtype=autocast or torch.bfloat16,
                enabled=autocast is not None,
            ):
                loss = F.cross_entropy(forward(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss.item()

    started = time.perf_counter()
    steps(4)
    warm_up = time.perf_counter() - started
    count = max(8, 2048 // BATCH_SIZE)
    started = time.perf_counter()
    steps(count)
    return count * BATCH_SIZE / (time.perf_counter() - started), warm_up


def head(split: Split, count: int) -> Split:
    return Split(split.images[:count].clone(), split.labels[:count].clone())


def load(args: argparse.Namespace) -> tuple[Dataset, str]:
    if args.dataset:
        data = load_dataset(args.dataset, seed=0, data_dir=args.data_dir)
        return data, args.dataset
    if SHARED_CIFAR.is_dir():
        return load_dataset(f"folder:{SHARED_CIFAR}", seed=0), "CIFAR-10 (JPEG copy)"
    # Throughput does not depend on what the pixels show: random CIFAR-shaped images.
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(args.images) % 10
    split = Split(images, labels)
    names = tuple(str(n) for n in range(10))
    data = Dataset("random", split, split, split, names, (0.5,) * 3, (0.25,) * 3, True)
    return data, "random 32x32 RGB images (CIFAR-10 not found)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="a compsearch dataset name (default: CIFAR-10 copy)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--images", type=int, default=8192, help="training images per epoch")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="force bf16 autocast on ours")
    parser.add_argument(
        "--compile", action="store_true", help="also time the step alone through torch.compile"
    )
    args = parser.parse_args()

    data, described = load(args)
    data = dataclasses.replace(data, train=head(data.train, args.images))
    device = torch.device(args.device)
    print(
        f"{described}: {len(data.train)} training images, batch {BATCH_SIZE}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, device {device}, "
        f"our autocast {autocast_dtype(device) or 'none (fp32)'}"
    )
    print(
        f"{'model':<9} {'res':>4} {'ours img/s':>11} "
        + " ".join(f"{f'conv w={w}':>11}" for w in args.workers)
        + f" {'speed-up':>9} {'step alone':>11} {'ceiling':>8}"
        + (f" {'compiled':>9} {'compile s':>10}" if args.compile else "")
    )
    for model_name in args.models:
        widths, depth = MODELS[model_name]
        arch = residual_arch(data.channels, data.num_classes, widths, depth)
        for resolution in args.resolutions:
            ours = our_epoch(arch, data, args.device, resolution, args.bf16)
            conventional = [
                conventional_epoch(arch, data.train, data, resolution, w) for w in args.workers
            ]
            alone, _ = step_alone(arch, args.device, resolution, data.channels)
            compiled = ""
            if args.compile:
                rate, seconds = step_alone(arch, args.device, resolution, data.channels, True)
                compiled = f" {rate:>9.0f} {seconds:>10.1f}"
            print(
                f"{model_name:<9} {resolution:>4} {ours:>11.0f} "
                + " ".join(f"{c:>11.0f}" for c in conventional)
                + f" {ours / max(conventional):>8.2f}x {alone:>11.0f}"
                + f" {alone / max(conventional):>7.2f}x"
                + compiled,
                flush=True,
            )


if __name__ == "__main__":
    main()
