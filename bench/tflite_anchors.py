"""The anchors of the CIFAR-10 space as int8 files for a microcontroller: the `.tflite`
file `export --format tflite` writes and the int8 ONNX file, their bytes and peak
activation memory (spaces/memory.py's count, on each file's own graph), against MLPerf
Tiny's ResNet-8 (99.3 KB int8 .tflite, about 54 KB of arena).

Bytes and peak memory do not depend on the weights' values, so the networks are
untrained (seeded) and calibrated on random images; accuracy is `export`'s to measure.
Needs the tflite extra (pip install -e ".[tflite]").

    python bench/tflite_anchors.py --results bench/results/tflite_anchors.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import optuna
import torch
from cifar10_300kb import machine  # bench/, beside this script

from compsearch.objectives.compress import export
from compsearch.objectives.memory import peak_activation_bytes
from compsearch.objectives.tflite import export_tflite, missing_reason, tflite_peak_bytes
from compsearch.search.anchors import ANCHORS, anchor_params
from compsearch.search.loop import default_schedule
from compsearch.spaces.builder import build
from compsearch.spaces.space import sample, space_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="write the table here as markdown")
    args = parser.parse_args()
    reason = missing_reason()
    if reason:
        raise SystemExit(reason)
    space = space_for(3, 10, 32)
    calibration = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    lines = [
        f"Machine: {machine()}. CIFAR-10 shapes (3x32x32, 10 classes), int8.",
        "",
        "| anchor | params | .tflite bytes | .tflite peak memory | ONNX int8 bytes "
        "| ONNX int8 peak memory |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        for name, anchor in ANCHORS.items():
            params = anchor_params(anchor, space)
            config = sample(optuna.trial.FixedTrial(params), space, default_schedule(10, 32))
            torch.manual_seed(0)
            model = build(config.arch).eval()
            tflite = export_tflite(model, 3, 32, calibration, Path(folder) / f"{name}.tflite")
            onnx_path = export(model, "int8", 32, 3, Path(folder) / f"{name}.onnx", calibration)
            count = sum(p.numel() for p in model.parameters())
            lines.append(
                f"| {name} | {count:,} | {tflite.stat().st_size:,} | "
                f"{tflite_peak_bytes(tflite):,} | {onnx_path.stat().st_size:,} | "
                f"{peak_activation_bytes(onnx.load(onnx_path)):,} |"
            )
            print(lines[-1], flush=True)
    command = shlex.join(["python", "bench/tflite_anchors.py", *sys.argv[1:]])
    lines += ["", "MLPerf Tiny's ResNet-8: 99.3 KB int8 .tflite, about 54 KB of arena.", "",
              f"`{command}`", ""]  # fmt: skip
    print("\n".join(lines))
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
