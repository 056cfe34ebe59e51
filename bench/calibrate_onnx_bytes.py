"""Fit the file byte estimate's overhead constants to real exported files.

Exports many sampled (untrained) configs at every precision (ONNX) or as int8 .tflite
files (`--format tflite`, needs compsearch[tflite]), fits the bytes beyond the weights by
least squares on relative error and prints the constants for spaces/estimate.py together
with the estimate's error as it stands. File sizes do not depend on training, so
untrained weights (with realistic batch-norm statistics) suffice.

    python bench/calibrate_onnx_bytes.py [--configs 30] [--format onnx|tflite]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import warnings
from pathlib import Path

import numpy as np
import optuna
import torch

from compsearch.objectives.compress import export, prune
from compsearch.spaces.blocks import ACTIVATIONS
from compsearch.spaces.builder import build
from compsearch.spaces.config import FILE_FORMATS, PRECISIONS, TrainConfig
from compsearch.spaces.estimate import (
    count_layers,
    file_bytes,
    node_features,
    weight_bytes,
)
from compsearch.spaces.space import SearchSpace, sample


def precisions_of(file_format: str) -> tuple[str, ...]:
    return ("int8",) if file_format == "tflite" else PRECISIONS


def write_file(model, precision, resolution, channels, folder, calibration, file_format) -> Path:
    if file_format == "tflite":
        from compsearch.objectives.tflite import write_tflite

        return write_tflite(model, calibration, folder / "m.tflite").path
    return export(model, precision, resolution, channels, folder / "m.onnx", calibration)


def exported_sizes(configs: int, folder: Path, file_format: str) -> list[dict]:
    schedule = TrainConfig(0, 0, 0, 0, 64, 0.1, 0.0, 0.0)
    rows = []
    for resolution, channels in ((8, 1), (28, 1), (32, 3)):
        # One to four stages: networks with few convolutions separate the fixed bytes
        # from the per-convolution bytes.
        spaces = [
            SearchSpace(channels, 10, resolution, stages=stages, width=(4, 64), stem_width=(4, 32))
            for stages in (1, 2, 3, 4)
        ]
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=resolution))
        for index in range(configs):
            space = spaces[index % len(spaces)]
            config = sample(study.ask(), space, schedule)
            torch.manual_seed(0)
            model = build(config.arch).eval()
            for module in model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.normal_()
                    module.running_var.uniform_(0.5, 2.0)
            example = torch.zeros(1, channels, resolution, resolution)
            # Local L2 pruning: the estimate is exact for it, so it calibrates the bytes.
            compress = dataclasses.replace(
                config.compress, prune_criterion="l2", prune_scope="local"
            )
            arch = prune(model, config.arch, compress, example)
            counts = count_layers(arch, resolution)
            calibration = (
                np.random.default_rng(0)
                .normal(size=(64, channels, resolution, resolution))
                .astype(np.float32)
            )
            for precision in precisions_of(file_format):
                path = write_file(
                    model, precision, resolution, channels, folder, calibration, file_format
                )
                rows.append(
                    dict(
                        precision=precision,
                        activation=arch.activation,
                        counts=counts,
                        real=path.stat().st_size,
                        estimate=file_bytes(counts, precision, arch.activation, file_format),
                    )
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=30, help="configs per input shape")
    parser.add_argument("--format", choices=FILE_FORMATS, default="onnx", dest="file_format")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as folder:
        rows = exported_sizes(args.configs, Path(folder), args.file_format)
    tflite = args.file_format == "tflite"
    for precision in precisions_of(args.file_format):
        subset = [row for row in rows if row["precision"] == precision]
        real = np.array([row["real"] for row in subset], dtype=float)
        current = np.array([row["estimate"] for row in subset], dtype=float)
        error = (current / real - 1) * 100
        worst = int(np.abs(error).argmax())
        print(
            f"{precision}: {len(subset)} files, {real.min():.0f}..{real.max():.0f} bytes; "
            f"current estimate error {error.mean():+.3f}% mean, {np.abs(error).max():.3f}% max "
            f"(a {real[worst]:.0f}-byte file), {int((np.abs(error) > 2).sum())} files off by "
            "more than 2%"
        )
        features = {"fixed": [1.0] * len(subset)}
        for name in node_features(subset[0]["counts"]):
            features[f"per {name}"] = [node_features(row["counts"])[name] for row in subset]
        for activation in ACTIVATIONS:
            features[f"per {activation}"] = [
                row["counts"].activations * (row["activation"] == activation) for row in subset
            ]
        if tflite:  # the int8 weights; each bias's bytes are fitted
            features["per bias"] = [biases(row["counts"]) for row in subset]
            weights = np.array(
                [row["counts"].params - row["counts"].batchnorm_channels - biases(row["counts"])
                 for row in subset], dtype=float,
            )  # fmt: skip
        else:
            weights = np.array(
                [weight_bytes(row["counts"], precision) for row in subset], dtype=float
            )
        matrix = np.array(list(features.values()), dtype=float).T
        # Relative errors matter: weigh each file by 1 / its size, so small files count.
        coefficients, *_ = np.linalg.lstsq(
            matrix / real[:, None], (real - weights) / real, rcond=None
        )
        fitted = weights + matrix @ coefficients
        fit_error = np.abs(fitted / real - 1).max() * 100
        constants = ", ".join(f"{k} {v:.0f}" for k, v in zip(features, coefficients, strict=True))
        print(f"  fitted: {constants}; max error {fit_error:.3f}%")


def biases(counts) -> int:
    return counts.batchnorm_channels + counts.biases


if __name__ == "__main__":
    main()
