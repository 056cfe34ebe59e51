"""The headline run: search CIFAR-10 within 2M parameters and 300 KB, then export the best.

Two commands, as a user types them, timed end to end:

    compsearch run --dataset folder:DATA --budget-params 2e6 --budget-kb 300 \\
        --time SEARCH_S --epochs E --subset S ...
    compsearch export --epochs X ...

The search gets `--minutes` times (1 - `--export-share`, default 0.5) of wall time
(`--time`: no trial starts after it; the one running finishes). The export then gets
as many epochs on the training part of the split as the time left allows, judged from
the chosen trial's own speed (at least the trials' epochs, at most ten times them).
Printed at the end: the test
accuracy of model.onnx in onnxruntime, its size, params and MACs, the wall times and the
machine. The data is the JPEG-decoded copy of CIFAR-10 in ../shared/data: figures from it
are "CIFAR-10 (JPEG copy)", not official CIFAR-10 figures.

    python bench/cifar10_300kb.py                         # 60 minutes, this machine
    python bench/cifar10_300kb.py --budget-macs 20e6      # every trial short on 2 cores
    python bench/cifar10_300kb.py --minutes 60 --workers 4 --device cuda
    # a microcontroller: 64 KB of activations, every trial an int8 .tflite file
    python bench/cifar10_300kb.py --budget-ram 64 --format tflite --results FILE.md

`--results` writes the table, the search's feasible Pareto front and the machine to a
markdown file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from workers_throughput import cpu_name  # bench/, beside this script

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
STUDY = "cifar10"
MAX_EXPORT_FACTOR = 10  # export epochs at most this many times the trials'


def machine() -> str:
    text = f"{cpu_name()}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name(0)}"
        else:  # what decides the CPU's training speed: whether bf16 is native
            native = (
                torch.cpu._is_amx_tile_supported()
                and "AMX"
                or (torch.cpu._is_avx512_bf16_supported() and "AVX-512 bf16")
            )
            text += f", {native} (bf16 training)" if native else ", no native bf16 (fp32)"
        text += f", torch {torch.__version__}"
    except ImportError:
        pass
    return text


def compsearch(args: list[str], cwd: Path) -> float:
    """Run one command, its output shown as it comes; its wall time in seconds."""
    command = [sys.executable, "-m", "compsearch", *args]
    print("$ compsearch " + " ".join(args), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"compsearch {args[0]} exited with {result.returncode}")
    return seconds


def results_table(
    card: dict,
    frame,
    search_wall: float,
    export_wall: float,
    export_epochs: int,
    total: float,
    budget_macs: str | None,
    budget_ram: str | None = None,
) -> str:
    """The README's row: the export's verified figures, the wall times and the machine;
    a .tflite export's file where there is one."""
    trained = frame[frame["trained"].astype(bool)]
    counts = (
        f"{len(frame)} trials: {len(trained)} trained, "
        f"{int(frame['feasible'].astype(bool).sum())} feasible"
    )
    budgets = "2M params, 300 KB" + (f", {float(budget_macs) / 1e6:g}M MACs" if budget_macs else "")
    budgets += f", {float(budget_ram):g} KB RAM" if budget_ram else ""
    tflite = card.get("tflite")
    if tflite:
        accuracy = f"{tflite['test_accuracy']:.2%} (.tflite, LiteRT)"
        size = f"{tflite['size_kb']:.1f} KB .tflite, {tflite['ram_kb']:.1f} KB RAM"
    else:
        accuracy = f"{card['test_accuracy']:.2%}"
        size = f"{card['size_kb']:.1f} KB ({card['precision']}), {card['ram_kb']:.1f} KB RAM"
    return "\n".join(
        [
            "| dataset | budgets | test accuracy | file | params | MACs | search | export "
            "| total | machine |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| CIFAR-10 (JPEG copy) | {budgets} | {accuracy} "
            f"| {size} | {card['params']:,} "
            f"| {card['macs'] / 1e6:.1f}M | {search_wall / 60:.1f} min ({counts}) "
            f"| {export_wall / 60:.1f} min ({export_epochs} epochs) | {total / 60:.1f} min "
            f"| {machine()} |",
        ]
    )


def front_table(front) -> str:
    """The search's feasible Pareto front, most accurate first, as `show` lists it."""
    rows = [
        "| trial | anchor | validation accuracy | KB | RAM KB | params | MACs | ms | epochs "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in front:
        rows.append(
            f"| {record.number} | {record.anchor or '-'} | {record.accuracy:.2%} "
            f"| {record.size_kb:.1f} | {record.ram_kb:.1f} | {int(record.params):,} "
            f"| {record.macs / 1e6:.1f}M | {record.latency_ms:.3f} "
            f"| {record.config.train.epochs if record.config else '-'} | {record.seconds:.0f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="the CIFAR-10 image folder")
    parser.add_argument("--minutes", type=float, default=60, help="search and export together")
    parser.add_argument(
        "--export-share", type=float, default=0.5, help="of the minutes, for the export"
    )
    parser.add_argument("--epochs", default="8", help="epochs per trial")
    parser.add_argument("--subset", default="10000", help="training images per trial")
    parser.add_argument(
        "--budget-macs",
        help="a MACs budget as well (e.g. 20e6), keeping every trial short on a CPU",
    )
    parser.add_argument("--budget-ram", help="a peak activation memory budget in KB (e.g. 64)")
    parser.add_argument("--format", default="onnx", help="onnx or tflite: each trial's file")
    parser.add_argument("--results", type=Path, help="a markdown file for the tables")
    parser.add_argument("--workers", default="1")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs-cifar10"))
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is not a folder; give --data the CIFAR-10 image folder")
    out = args.out.resolve()
    where = ["--out", str(out), "--study", STUDY]
    budget_seconds = args.minutes * 60
    search_seconds = budget_seconds * (1 - args.export_share)
    started = time.perf_counter()
    search_wall = compsearch(
        [
            "run", "--dataset", f"folder:{args.data.resolve()}", "--budget-params", "2e6",
            "--budget-kb", "300", "--time", f"{search_seconds:.0f}", "--trials", "100000",
            "--epochs", args.epochs, "--subset", args.subset, "--workers", args.workers,
            "--device", args.device, *where,
            *(["--budget-macs", args.budget_macs] if args.budget_macs else []),
            *(["--budget-ram", args.budget_ram] if args.budget_ram else []),
            "--format", args.format,
        ],
        out.parent,
    )  # fmt: skip
    import pandas as pd

    from compsearch.search import api

    frame = pd.read_csv(out / STUDY / "trials.csv")
    # The trial `export --trial best` will pick, and its seconds per training image and
    # epoch. Those seconds also hold its measuring and compression, a larger share of a
    # short trial than of the export, so the estimate errs on the slow side and leaves the
    # export's own measuring its time.
    view = api.show(STUDY, out=out)
    best = view.best
    if best is None:
        raise SystemExit("no feasible trial: give the search more --minutes")
    per_image_epoch = best.seconds / (int(args.epochs) * int(args.subset))
    train_images = 50_000 * 0.8  # the export trains on the training part of the split
    left = budget_seconds - (time.perf_counter() - started)
    affordable = int(left / (per_image_epoch * train_images))
    export_epochs = max(int(args.epochs), min(MAX_EXPORT_FACTOR * int(args.epochs), affordable))
    print(
        f"trial {best.number}: {best.accuracy:.2%} validation accuracy, "
        f"{best.seconds:.0f} s for {args.epochs} epochs of {args.subset} images; "
        f"{left / 60:.1f} min left: export for {export_epochs} epochs",
        flush=True,
    )
    export_wall = compsearch(["export", "--epochs", str(export_epochs), *where], out.parent)
    card = json.loads((out / STUDY / "export" / "model.json").read_text())
    total = time.perf_counter() - started
    table = results_table(
        card, frame, search_wall, export_wall, export_epochs, total, args.budget_macs,
        args.budget_ram,
    )  # fmt: skip
    note = (
        f"validation accuracy {card['validation_accuracy']:.2%} (ONNX); trial {card['trial']}; "
        f"files in {out / STUDY}"
    )
    print()
    print(table)
    print(note)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(
            f"# `python {' '.join(sys.argv)}`\n\n{table}\n\n{note}\n\n"
            f"Feasible Pareto front of the search ({machine()}):\n\n{front_table(view.front)}\n"
        )


if __name__ == "__main__":
    main()
