"""The published tiny CIFAR-10 models, as configs of our own space, trained by our trainer.

ResNet-8 (MLPerf Tiny's image-classification model: 16/32/64 channels, one basic block
per stage) and ResNet-20 (the CIFAR ResNet: 16/32/64 channels, three basic blocks per
stage) are written as the parameters `compsearch run` samples: relu, 3x3 kernels, strides
1/2/2, a 1x1 projection where the shape changes, no squeeze-excitation, no pruning. Each
is trained once exactly as `compsearch export` trains a trial (the same split of the data,
the training part of it; the same schedule for `--epochs`; the same seed), then written
twice through the trial's own deploy step: as an fp32 ONNX file and as an int8 one (with
the quantization-aware fine-tune when post-training quantization loses more than 0.3
validation points). onnxruntime measures both files on the official test images.

Give `--like OUT/STUDY/export/model.json` to train with the epochs and training
resolution of an export (the headline run's, bench/cifar10_300kb.py), so that only the
architecture differs. The data is the JPEG-decoded copy of CIFAR-10 in ../shared/data:
figures from it are "CIFAR-10 (JPEG copy)".

    python bench/cifar10_anchors.py --like runs-cifar10/cifar10/export/model.json
    python bench/cifar10_anchors.py --epochs 2 --subset 500 --anchors resnet8   # a toy check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
WIDTHS = (16, 32, 64)
STRIDES = (1, 2, 2)
# name: blocks per stage
ANCHORS = {"resnet8": (1, 1, 1), "resnet20": (3, 3, 3)}
# What the papers report, for the table: (name, fp32 accuracy, int8 accuracy and KB).
PUBLISHED = {
    "resnet8": "MLPerf Tiny: 86.1%, 99 KB int8",
    "resnet20": "91.25-92.6% fp32, 0.27M params; 93.8% at 268 KB int8 QAT",
}


def anchor_params(depths: tuple[int, ...], train_resolution: int, precision: str) -> dict:
    """The parameters of `spaces.space.sample` that give this anchor."""
    params: dict[str, Any] = {
        "activation": "relu",
        "leaky_relu_slope": 0.1,  # unused with relu
        "stem_width": WIDTHS[0],
        "train_resolution": train_resolution,
        "precision": precision,
        "prune_fraction": 0.0,
        "prune_criterion": "l2",
        "prune_scope": "local",
    }
    for index, (width, depth, stride) in enumerate(zip(WIDTHS, depths, STRIDES, strict=True), 1):
        name = f"stage{index}_"
        params |= {
            name + "width": width,
            name + "block": "basic",
            name + "depth": depth,
            name + "kernel_size": 3,
            name + "stride": stride,
            name + "expansion": 2,  # unused by basic blocks
            name + "groups": 2,  # unused by basic blocks
            name + "squeeze_excitation": False,
        }
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="the CIFAR-10 image folder")
    parser.add_argument(
        "--like", type=Path, help="an export's model.json: its epochs and resolution"
    )
    parser.add_argument("--epochs", type=int, help="default: --like's, else 20")
    parser.add_argument("--train-resolution", type=int, help="default: --like's, else 16")
    parser.add_argument("--subset", type=int, help="training images (default: all of the part)")
    parser.add_argument("--anchors", nargs="+", choices=list(ANCHORS), default=list(ANCHORS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    like = json.loads(args.like.read_text()) if args.like else {}
    epochs = args.epochs or like.get("epochs") or 20
    trained_like = like.get("config", {}).get("train", {})
    train_resolution = args.train_resolution or trained_like.get("train_resolution") or 16
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is not a folder; give --data the CIFAR-10 image folder")

    import optuna
    import torch

    from compsearch.objectives.data import load_dataset
    from compsearch.objectives.measure import count_macs, count_params, file_size_kb, onnx_accuracy
    from compsearch.objectives.train import DeviceData, accuracy, autocast_dtype, predict
    from compsearch.objectives.trial import deploy, train_model
    from compsearch.search.loop import default_schedule
    from compsearch.spaces.space import SearchSpace, sample

    started = time.perf_counter()
    data = load_dataset(f"folder:{args.data.resolve()}", seed=args.seed, subset=args.subset)
    device = DeviceData(data, "cpu")
    print(
        f"{data.name}: {len(data.train)} training, {len(data.val)} validation, "
        f"{len(data.test)} test images, read in {time.perf_counter() - started:.0f} s; "
        f"{epochs} epochs, training resolution {train_resolution} px, "
        f"autocast {autocast_dtype(device.device) or 'none (fp32)'}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    space = SearchSpace(data.channels, data.num_classes, data.resolution)
    schedule = default_schedule(epochs, data.resolution)
    rows = []
    with tempfile.TemporaryDirectory(prefix="anchors-") as scratch:
        for name in args.anchors:
            int8 = sample(
                optuna.trial.FixedTrial(anchor_params(ANCHORS[name], train_resolution, "int8")),
                space,
                schedule,
            )
            began = time.perf_counter()
            model, int8 = train_model(int8, device, args.seed)
            train_seconds = time.perf_counter() - began
            torch_accuracy = accuracy(
                predict(model, device.val, device, data.resolution), device.val.labels
            )
            for precision in ("fp32", "int8"):  # fp32 first: int8's fine-tune trains a copy
                config = dataclasses.replace(
                    int8, compress=dataclasses.replace(int8.compress, precision=precision)
                )
                path = Path(scratch) / f"{name}-{precision}.onnx"
                deployed = deploy(
                    model, config, data, device, path, data.val, args.seed, torch_accuracy
                )
                row = {
                    "anchor": name,
                    "precision": precision,
                    "test_accuracy": onnx_accuracy(path, data.test, data, data.resolution),
                    "validation_accuracy": deployed.accuracy,
                    "quantization_aware": deployed.quantization_aware,
                    "size_kb": file_size_kb(path),
                    "params": count_params(model),
                    "macs": count_macs(model.cpu(), data.channels, data.resolution),
                    "train_seconds": train_seconds,
                    "epochs": epochs,
                    "train_resolution": train_resolution,
                }
                model.to(device.device)
                rows.append(row)
                print(
                    f"{name} {precision}: test {row['test_accuracy']:.2%} "
                    f"(validation {row['validation_accuracy']:.2%}"
                    f"{', QAT' if row['quantization_aware'] else ''}), "
                    f"{row['size_kb']:.1f} KB, {row['params']:,} params, "
                    f"{row['macs'] / 1e6:.1f}M MACs, trained in {train_seconds / 60:.1f} min",
                    flush=True,
                )
    print()
    print("| model | precision | test accuracy | size | params | MACs | training | published |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['anchor']} | {row['precision']} | {row['test_accuracy']:.2%} "
            f"| {row['size_kb']:.1f} KB | {row['params']:,} | {row['macs'] / 1e6:.1f}M "
            f"| {row['epochs']} epochs, {row['train_seconds'] / 60:.1f} min "
            f"| {PUBLISHED[row['anchor']]} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
