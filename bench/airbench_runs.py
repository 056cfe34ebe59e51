"""Run airbench94.py's own training N times, its file unmodified, and keep its figures.

airbench94.py, run as a script, trains 25 times and has no option for fewer. This imports
it as a module (so its `__main__` block does not run), prints its table header, runs its
`main('warmup')` once (random labels: it only warms the GPU up, as its own commented-out
line would), then `main(run)` for each of `--runs` runs, as its `__main__` block does.
Everything it prints is shown as it comes and also parsed: each run's final row gives the
accuracy after test-time augmentation and airbench's own timing (`total_time_seconds`:
training and the whitening-layer setup and the final evaluation, measured with CUDA events;
the per-epoch evaluations are not timed), and the row before it the accuracy without
test-time augmentation.

It needs CUDA, and `cifar10/train.pt` and `cifar10/test.pt` under `--data-root` (see
bench/cifar_tensors.py), or it downloads CIFAR-10 through torchvision.

    python bench/airbench_runs.py --file .airbench/airbench94.py --data-root .data --runs 5
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class Tee(io.TextIOBase):
    """Writes through to `stream` and keeps a copy."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.kept = io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.stream.flush()
        return self.kept.write(text)

    def flush(self) -> None:
        self.stream.flush()


def load(path: Path):
    spec = importlib.util.spec_from_file_location("airbench94", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_runs(text: str, columns: list[str]) -> list[dict[str, Any]]:
    """One dict per run from airbench's printed table: the 'eval' row's tta_val_acc and
    total_time_seconds, and val_acc from the last epoch row before it."""
    names = [c.strip() for c in columns]
    runs, last_epoch = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != len(names) or cells == names:
            continue
        row = dict(zip(names, cells, strict=True))
        if row["epoch"] == "eval":
            runs.append(
                {
                    "tta_val_acc": float(row["tta_val_acc"]),
                    "total_time_seconds": float(row["total_time_seconds"]),
                    "val_acc": float(last_epoch["val_acc"]) if last_epoch else None,
                    "epochs": int(last_epoch["epoch"]) + 1 if last_epoch else None,
                }
            )
            last_epoch = None
        else:
            last_epoch = row
    return runs


def describe(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=Path(".airbench/airbench94.py"))
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path(".data"),
        help="the folder holding cifar10/ (airbench reads ./cifar10)",
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-warmup", action="store_true", help="skip main('warmup')")
    parser.add_argument("--json", type=Path, help="write the runs' figures here")
    args = parser.parse_args()

    path = args.file.resolve()
    json_path = args.json.resolve() if args.json else None
    module = load(path)
    os.chdir(args.data_root)
    import torch

    facts = {
        "file": str(path),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "hyp": module.hyp,
    }
    print(" ".join(f"{k}={v}" for k, v in facts.items() if k != "hyp"), flush=True)
    tee = Tee(sys.stdout)
    accuracies, walls = [], []
    with contextlib.redirect_stdout(tee):
        module.print_columns(module.logging_columns_list, is_head=True)
        if not args.no_warmup:
            module.main("warmup")
        for run in range(args.runs):
            started = time.perf_counter()
            accuracies.append(module.main(run))
            walls.append(time.perf_counter() - started)
    runs = parse_runs(tee.kept.getvalue(), module.logging_columns_list)
    runs = runs[len(runs) - args.runs :]  # the warm-up run's row comes first
    for run, wall in zip(runs, walls, strict=True):
        run["wall_seconds"] = wall  # with per-epoch evaluations and data loading
    print(f"tta accuracy: {describe(accuracies)} over {args.runs} runs", flush=True)
    if runs:
        print(f"no-tta accuracy: {describe([r['val_acc'] for r in runs])}", flush=True)
        print(f"airbench seconds: {describe([r['total_time_seconds'] for r in runs])}", flush=True)
    if json_path is not None:
        report = {"facts": facts, "runs": runs, "tta_accuracies": accuracies}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
