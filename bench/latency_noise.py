"""How noisy `latency_ms` is on this machine, and how well the latency model predicts it.

Exports the anchors of the CIFAR-10 space (untrained: latency does not depend on the
weights' values) at int8 and fp32 and measures each file's latency (objectives/latency.py:
onnxruntime, one thread, the median of timed runs after warm-up) `--repeats` times in
turn, so that a neighbour's burst lands on all files alike; then calibrates the latency
model as a search does and prints its prediction beside the measured median. With
`--tflite` (needs compsearch[tflite]) each anchor's int8 .tflite file too, timed in LiteRT
as `run --format tflite` times its trials (objectives/tflite.py).

    python bench/latency_noise.py --repeats 20 --results bench/results/latency_noise.md
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import optuna
import torch
from cifar10_300kb import machine  # bench/, beside this script

from compsearch.objectives.compress import export
from compsearch.objectives.latency import file_latency_ms
from compsearch.search.anchors import ANCHORS, anchor_params
from compsearch.search.latency import calibrate_latency
from compsearch.search.loop import default_schedule
from compsearch.spaces.builder import build
from compsearch.spaces.config import CompressConfig, TrialConfig
from compsearch.spaces.space import sample, space_for

TFLITE = "int8 .tflite (LiteRT)"


def latency_ms(path: Path) -> float:
    if path.suffix == ".tflite":
        from compsearch.objectives.tflite import tflite_latency_ms

        return tflite_latency_ms(path)
    return file_latency_ms(path, 3, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--precisions", nargs="+", default=["int8", "fp32"])
    parser.add_argument("--results", type=Path, help="write the table here as markdown")
    parser.add_argument("--tflite", action="store_true", help="also the int8 .tflite files")
    args = parser.parse_args()
    space = space_for(3, 10, 32)
    schedule = default_schedule(10, 32)
    calibration = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    files = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, anchor in ANCHORS.items():
            config = sample(optuna.trial.FixedTrial(anchor_params(anchor, space)), space, schedule)
            for precision in args.precisions:
                torch.manual_seed(0)
                path = Path(folder) / f"{name}-{precision}.onnx"
                export(build(config.arch).eval(), precision, 32, 3, path, calibration)
                files[(name, precision)] = (path, config)
            if args.tflite:
                from compsearch.objectives.tflite import write_tflite

                torch.manual_seed(0)
                path = Path(folder) / f"{name}.tflite"
                write_tflite(build(config.arch).eval(), calibration, path)
                files[(name, TFLITE)] = (path, config)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in files}
        for _ in range(args.repeats):
            for key, (path, _) in files.items():
                times[key].append(latency_ms(path))
        model = calibrate_latency(space, schedule, seed=0)
    lines = [
        f"Machine: {machine()}; onnxruntime (LiteRT's builtin kernels for .tflite), one "
        f"thread; {args.repeats} measurements of each "
        "file, taken in turn; each measurement is itself the median of timed runs.",
        "",
        "| anchor | precision | median ms | lowest | highest | (highest - lowest) / median "
        "| middle 80% / median | predicted ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, precision), values in times.items():
        config = files[(name, precision)][1]
        predicted = "-"  # the model is fitted to ONNX files
        if precision != TFLITE:
            config = TrialConfig(config.arch, config.train, CompressConfig(precision, 0.0))
            predicted = f"{model.predict(config):.3f}"
        middle = statistics.median(values)
        deciles = statistics.quantiles(values, n=10)  # the 10th to the 90th percentile
        lines.append(
            f"| {name} | {precision} | {middle:.3f} | {min(values):.3f} | {max(values):.3f} "
            f"| {(max(values) - min(values)) / middle:.1%} "
            f"| {(deciles[-1] - deciles[0]) / middle:.1%} | {predicted} |"
        )
    lines += [
        "",
        f"Latency model: worst relative error {model.worst_error:.1%} on its calibration files.",
        "",
        f"`{shlex.join(['python', 'bench/latency_noise.py', *sys.argv[1:]])}`",
        "",
    ]
    print("\n".join(lines))
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
