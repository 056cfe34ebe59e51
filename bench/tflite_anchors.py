"""The equal-time anchors as int8 `.tflite` files, against MLPerf Tiny's ResNet-8.

Each anchor (ResNet-8, ResNet-20, as `run` queues them) is trained by the export's
trainer for `--epochs` on CIFAR-10 (JPEG copy: the whole training split less the
validation part), its int8 ONNX files written and measured as `export` does (post-training
and quantization-aware), and each converted to `.tflite` as `export --format tflite` does
(objectives/tflite.py). For every file: test accuracy in its runtime (onnxruntime, LiteRT),
bytes, peak activation memory (spaces/memory.py's schedule over the file's own graph) and
the median single-image latency on one thread of this machine. Needs compsearch[tflite].

    python bench/tflite_anchors.py --data ../shared/data/cifar10-jpeg --epochs 10 \
        --results bench/results/tflite_anchors.md
    python bench/tflite_anchors.py --epochs 2 --subset 1000 --anchors resnet8  # a toy check
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
# MLPerf Tiny v1.0, image classification: the int8 ResNet-8 `.tflite` reference.
PUBLISHED = "MLPerf Tiny ResNet-8: 99.3 KB int8 .tflite, about 54 KB of arena, 86.1% (int8)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="the CIFAR-10 image folder")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--subset", type=int, help="training images (toy checks)")
    parser.add_argument("--anchors", nargs="+", default=["resnet8", "resnet20"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, help="the table's .md (the .json beside it)")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is not a folder; give --data the CIFAR-10 image folder")

    import optuna
    import torch

    from compsearch.objectives.data import load_dataset
    from compsearch.objectives.measure import calibration_images, onnx_accuracy
    from compsearch.objectives.tflite import (
        missing_tflite,
        tflite_accuracy,
        tflite_latency_ms,
        tflite_ram_kb,
        write_tflite,
    )
    from compsearch.objectives.train import DeviceData, autocast_dtype, export_recipe
    from compsearch.objectives.trial import (
        CALIBRATION_IMAGES,
        compression_candidates,
        train_model,
    )
    from compsearch.search.anchors import ANCHORS, anchor_params
    from compsearch.search.loop import default_schedule
    from compsearch.spaces.budgets import Budgets
    from compsearch.spaces.space import sample, space_for

    missing = missing_tflite()
    if missing:
        raise SystemExit(missing)
    data = load_dataset(f"folder:{args.data.resolve()}", seed=args.seed, subset=args.subset)
    on_device = DeviceData(data, "cpu")
    space = space_for(data.channels, len(data.class_names), data.resolution)
    schedule = default_schedule(args.epochs, data.resolution)
    budgets = Budgets(params=2e6, size_kb=300)
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"autocast {autocast_dtype(on_device.device) or 'none (fp32)'}, torch {torch.__version__}"
    )
    print(f"{len(data.train)} training images, {args.epochs} epochs; {machine}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tflite-anchors-") as scratch:
        for name in args.anchors:
            params = anchor_params(ANCHORS[name], space) | {"precision": "int8"}
            config = sample(optuna.trial.FixedTrial(params), space, schedule)
            started = time.perf_counter()
            model, deployed = train_model(
                config, on_device, args.seed, recipe=export_recipe(args.epochs)
            )
            trained = time.perf_counter() - started
            folder = Path(scratch) / name
            folder.mkdir()
            candidates = compression_candidates(
                model, deployed, data, on_device, folder, args.seed, ("int8",), budgets,
                quantization_aware_seconds=0.25 * trained,
            )  # fmt: skip
            calibration = calibration_images(
                data, deployed.train.test_resolution, CALIBRATION_IMAGES, args.seed
            )
            for candidate in candidates:
                if not candidate.written:
                    print(f"{name} {candidate.name}: {candidate.note}", flush=True)
                    continue
                tflite_path = candidate.path.with_suffix(".tflite")
                began = time.perf_counter()
                write_tflite(candidate.model, calibration, tflite_path)
                converted = time.perf_counter() - began
                row = {
                    "anchor": name,
                    "source": candidate.name,
                    "epochs": args.epochs,
                    "train_seconds": trained,
                    "params": candidate.params,
                    "onnx_test": onnx_accuracy(candidate.path, data.test, data, data.resolution),
                    "onnx_bytes": candidate.path.stat().st_size,
                    "onnx_ram_kb": candidate.ram_kb,
                    "onnx_latency_ms": candidate.latency_ms,
                    "tflite_test": tflite_accuracy(tflite_path, data.test, data, data.resolution),
                    "tflite_bytes": tflite_path.stat().st_size,
                    "tflite_ram_kb": tflite_ram_kb(tflite_path),
                    "tflite_latency_ms": tflite_latency_ms(tflite_path),
                    "convert_seconds": converted,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    lines = [
        f"Anchors as int8 files, CIFAR-10 (JPEG copy), {len(data.train)} training images, "
        f"{args.epochs} epochs, test accuracy on {len(data.test)} images; machine: {machine}",
        "",
        "| anchor | int8 from | ONNX test | ONNX bytes | ONNX peak | .tflite test "
        "| .tflite bytes | .tflite peak | latency ORT / LiteRT | training |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['anchor']} | {row['source']} | {row['onnx_test']:.2%} "
            f"| {row['onnx_bytes']:,} | {row['onnx_ram_kb']:.1f} KB | {row['tflite_test']:.2%} "
            f"| {row['tflite_bytes']:,} | {row['tflite_ram_kb']:.1f} KB "
            f"| {row['onnx_latency_ms']:.2f} / {row['tflite_latency_ms']:.2f} ms "
            f"| {row['train_seconds']:.0f} s |"
        )
    lines += ["", f"Published: {PUBLISHED}.", "", "`python bench/tflite_anchors.py "
              f"--epochs {args.epochs} --data {args.data}`"]  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    if args.results:
        args.results.write_text(table)
        args.results.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
        print(f"written: {args.results}")


if __name__ == "__main__":
    main()
