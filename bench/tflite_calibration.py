"""What the .tflite file's calibration rule costs: each tensor's extremes against the
quantizer's moving average, on trials of a `run --format tflite` study.

Each trial's config is trained again as the trial trained it (its schedule, its seed, the
study's training images), then written as an ONNX int8 file and as two int8 .tflite
files calibrated on the same 256 training images: with `extremes` (what compsearch
writes: each tensor's lowest and highest value over the images, as onnxruntime's min-max
calibration) and with `moving-average` (ai-edge-quantizer's own rule: a running average of
each image's extremes, weight 0.95 on the past). Printed: validation accuracy of the ONNX
file in onnxruntime and of each .tflite file in LiteRT, the share of images whose
largest int8 logit is tied (the output saturated at 127), and the seconds each .tflite
file took to write (conversion, calibration, quantization).

    python bench/tflite_calibration.py --study runs-cifar10/cifar10/study.db \\
        --trials 0 2 25 --results bench/results/tflite_calibration.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
from cifar10_300kb import machine  # bench/, beside this script

from compsearch.objectives.catalog import CACHE_FOLDER
from compsearch.objectives.compress import export
from compsearch.objectives.data import load_dataset
from compsearch.objectives.measure import calibration_images, onnx_accuracy
from compsearch.objectives.tflite import CALIBRATIONS, load, run_images, write_tflite
from compsearch.objectives.train import DeviceData, normalize
from compsearch.objectives.trial import CALIBRATION_IMAGES, train_model
from compsearch.results.records import read_trials, study_settings
from compsearch.spaces.space import sample


def tflite_figures(path: Path, data, resolution: int) -> tuple[float, float]:
    """Validation top-1 in LiteRT, and the share of images whose top int8 logit ties."""
    interpreter = load(path)
    correct = tied = 0
    for start in range(0, len(data.val), 512):
        x = normalize(data.val.images[start : start + 512], data.mean, data.std, resolution)
        logits = run_images(interpreter, x.numpy())
        top = logits.max(1, keepdims=True)
        tied += int(((logits == top).sum(1) > 1).sum())
        labels = data.val.labels[start : start + 512].numpy()
        correct += int((logits.argmax(1) == labels).sum())
    return correct / len(data.val), tied / len(data.val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, required=True, help="the study's SQLite file")
    parser.add_argument("--trials", type=int, nargs="+", required=True)
    parser.add_argument("--data-dir", type=Path, help="where a folder dataset now lives")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{args.study}")
    settings = study_settings(study)
    records = {r.number: r for r in read_trials(study.get_trials(deepcopy=False))}
    name, stored = settings.data_source
    cache = args.study.parent.parent / CACHE_FOLDER  # the run's --out
    data = load_dataset(
        name, seed=settings.seed, subset=settings.subset,
        data_dir=args.data_dir or Path(stored), cache_folder=cache,
    )  # fmt: skip
    on_device = DeviceData(data, "cpu")
    rows = []
    for number in args.trials:
        record = records[number]
        config = sample(
            optuna.trial.FixedTrial(record.searched), settings.space, record.config.train
        )
        seed = settings.seed + number  # the trial's
        model, trained = train_model(config, on_device, seed=seed)
        model = model.cpu().eval()
        resolution = trained.train.test_resolution
        calibration = calibration_images(data, resolution, CALIBRATION_IMAGES, seed)
        row = {"trial": number, "params": record.params}
        with tempfile.TemporaryDirectory() as folder:
            onnx_file = export(
                model, "int8", resolution, data.channels, Path(folder) / "m.onnx", calibration
            )
            row["onnx"] = onnx_accuracy(onnx_file, data.val, data, resolution)
            for ranges in CALIBRATIONS:
                path = Path(folder) / f"{ranges}.tflite"
                began = time.perf_counter()
                write_tflite(model, calibration, path, ranges=ranges)
                row[f"{ranges} s"] = time.perf_counter() - began
                row[ranges], row[f"{ranges} tied"] = tflite_figures(path, data, resolution)
        rows.append(row)
        print(row, flush=True)
    lines = [
        f"`python bench/tflite_calibration.py --study {args.study} --trials "
        f"{' '.join(map(str, args.trials))}`: {data.name}, {len(data.train):,} training "
        f"images, validation on {len(data.val):,}; each trial retrained as it trained; "
        f"machine: {machine()}",
        "",
        "| trial | params | ONNX int8 | .tflite, extremes | tied | written in | "
        ".tflite, moving average | tied | written in |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['trial']} | {row['params']:,} | {row['onnx']:.2%} | "
            f"{row['extremes']:.2%} ({row['extremes'] - row['onnx']:+.2%}) | "
            f"{row['extremes tied']:.1%} | {row['extremes s']:.1f} s | "
            f"{row['moving-average']:.2%} ({row['moving-average'] - row['onnx']:+.2%}) | "
            f"{row['moving-average tied']:.1%} | {row['moving-average s']:.1f} s |"
        )
    gaps = {r: [row[r] - row["onnx"] for row in rows] for r in CALIBRATIONS}
    lines += [""] + [
        f"- {r}: against the ONNX int8 file mean {100 * np.mean(g):+.2f} points, worst "
        f"{100 * min(g):+.2f}"
        for r, g in gaps.items()
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        args.results.write_text(text)


if __name__ == "__main__":
    main()
