"""Equal time: compsearch against hand-picked networks and a random search, T minutes each.

On one machine, in one invocation, on CIFAR-10 (the JPEG copy in ../shared/data, its whole
training set split into training and validation as compsearch always does), within 2M
parameters and 300 KB:

- **compsearch**, as a user types it: `compsearch run --time S` then
  `compsearch export --time E`, S + E = T minutes with S = `--search-share` of T
  (several shares: one compsearch row each, to measure which split is best);
- **each anchor** (ResNet-8, ResNet-20, written as configs of the space exactly as
  `compsearch run` queues them), trained by the same trainer for T minutes (its epochs
  sized from a timed run of a few batches) and compressed by the export's own choice:
  every precision that can fit, the most accurate file on the validation split that fits;
- **a random search**: the same two commands with `--sampler random --no-anchors
  --rungs 1` (one fidelity); compsearch's own `--rungs` and `--fidelity` are this
  script's (default one rung counted in epochs, as `compsearch run`'s; several
  `--fidelity` values: one compsearch row each).

It prints one table (test accuracy of each model.onnx in onnxruntime, size, params, MACs,
minutes, machine) and compsearch's difference from the best anchor and from the random
search, and writes it to `--results` (default bench/results/equal_time_<T>min.md).

    python bench/equal_time.py --minutes 20
    python bench/equal_time.py --minutes 1.5 --device cuda     # on a GPU
    python bench/equal_time.py --minutes 1.5 --subset 2000 --anchor-subset 2000 --epochs 2 \
        --only resnet8 compsearch                                  # a toy check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from cifar10_300kb import machine  # bench/, beside this script

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = ("--budget-params", "2e6", "--budget-kb", "300")
ANCHORS = ("resnet8", "resnet20")
# Seconds of each compsearch pair kept back from the export's --time for what it does
# beyond training and compressing: loading the data, measuring the test split, the report.
EXPORT_OVERHEAD = 30.0


def compsearch(args: list[str], cwd: Path) -> float:
    """Run one command as a user would, its output shown as it comes; its wall seconds."""
    print("$ compsearch " + " ".join(args), flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "compsearch", *args], cwd=cwd)
    if result.returncode != 0:
        raise SystemExit(f"compsearch {args[0]} exited with {result.returncode}")
    return time.perf_counter() - started


def searched(
    label: str,
    extra: list[str],
    args: argparse.Namespace,
    out: Path,
    search_share: float,
    fidelity: str = "epochs",
) -> dict:
    """`run` for `search_share` of T then `export` for the rest; the export's figures."""
    total = args.minutes * 60
    where = ["--out", str(out), "--study", label]
    data = ["--dataset", f"folder:{args.data.resolve()}", "--device", args.device]
    run = [
        "run", *data, *BUDGETS, "--time", f"{total * search_share:.0f}s",
        "--trials", "100000", "--epochs", str(args.epochs), *extra, *where,
    ]  # fmt: skip
    if args.subset:
        run += ["--subset", str(args.subset)]
    if label != "random":  # the random search keeps one fidelity counted in epochs
        run += ["--rungs", str(args.rungs), "--fidelity", fidelity]
    started = time.perf_counter()
    search_wall = compsearch(run, out.parent)
    left = total - (time.perf_counter() - started) - EXPORT_OVERHEAD
    export = ["export", "--time", f"{max(left, 10):.0f}s", "--device", args.device, *where]
    export_wall = compsearch(export, out.parent)
    card = json.loads((out / label / "export" / "model.json").read_text())
    import pandas as pd

    frame = pd.read_csv(out / label / "trials.csv")
    return {
        "model": label,
        "test": card["test_accuracy"],
        "validation": card["validation_accuracy"],
        "size_kb": card["size_kb"],
        "precision": card["precision"] + (" QAT" if card["quantization_aware"] else ""),
        "params": card["params"],
        "macs": card["macs"],
        "minutes": (search_wall + export_wall) / 60,
        "detail": (
            f"search {search_wall / 60:.1f} min, {int(frame['trained'].sum())} trained of "
            f"{len(frame)}; trial {card['trial']}"
            + (f" ({card_anchor(frame, card['trial'])})" if card_anchor(frame, card["trial"])
               else "")
            + f", export {export_wall / 60:.1f} min, {card['epochs']} epochs"
        ),
    }  # fmt: skip


def card_anchor(frame, number: int) -> str:
    anchor = frame[frame["number"] == number]["anchor"].iloc[0]
    return anchor if isinstance(anchor, str) else ""


def anchor_row(name: str, args: argparse.Namespace, out: Path) -> dict:
    """One anchor trained for T minutes by the trainer trials and exports share, then
    compressed by the export's choice."""
    import optuna

    from compsearch.objectives.catalog import CACHE_FOLDER
    from compsearch.objectives.data import load_dataset
    from compsearch.objectives.measure import onnx_accuracy
    from compsearch.objectives.timing import time_training
    from compsearch.objectives.train import DeviceData, accuracy, export_recipe, predict
    from compsearch.objectives.trial import best_candidate, compression_candidates, train_model
    from compsearch.search.anchors import ANCHORS as KNOWN
    from compsearch.search.anchors import anchor_params
    from compsearch.search.jobs import QUANTIZATION_AWARE_SHARE, resolve_device, training_share
    from compsearch.search.loop import default_schedule, fit_to_budget
    from compsearch.spaces.budgets import Budgets
    from compsearch.spaces.space import sample, space_for

    started = time.perf_counter()
    device = resolve_device(args.device)
    data = load_dataset(
        f"folder:{args.data.resolve()}", seed=0, subset=args.anchor_subset,
        cache_folder=out / CACHE_FOLDER,
    )  # fmt: skip
    on_device = DeviceData(data, device)
    budgets = Budgets(params=2e6, size_kb=300)
    space = space_for(data.channels, len(data.class_names), data.resolution)
    schedule = default_schedule(2, data.resolution)
    params = anchor_params(KNOWN[name], space)
    params = fit_to_budget(params, space, schedule, budgets) or params
    probe = sample(optuna.trial.FixedTrial(params), space, schedule)
    images = 20 * schedule.batch_size
    per_image = time_training(probe, on_device, data.resolution, images, seed=0) / images
    deadline = started + args.minutes * 60
    left = deadline - time.perf_counter()
    # As an export plans for a trial whose int8 file lost nothing to post-training
    # quantization: the quantization-aware fine-tune runs if time is left.
    share = training_share(quantization_aware=False)
    epochs = max(2, int(share * left / (per_image * len(data.train))))
    config = sample(
        optuna.trial.FixedTrial(params), space, default_schedule(epochs, data.resolution)
    )
    print(f"{name}: {epochs} epochs of {len(data.train)} images on {device}", flush=True)
    trained_from = time.perf_counter()
    model, deployed = train_model(config, on_device, seed=0, recipe=export_recipe(epochs))
    trained_in = time.perf_counter() - trained_from
    torch_accuracy = accuracy(
        predict(model, on_device.val, on_device, data.resolution), on_device.val.labels
    )
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    candidates = compression_candidates(
        model, deployed, data, on_device, folder, 0, space.precisions, budgets,
        seconds_left=lambda: deadline - time.perf_counter(),
        quantization_aware_seconds=QUANTIZATION_AWARE_SHARE * trained_in,
    )  # fmt: skip
    chosen = best_candidate(candidates, budgets)
    if chosen is None:
        raise SystemExit(f"{name}: no file fits the budgets")
    test = onnx_accuracy(chosen.path, data.test, data, data.resolution)
    tried = ", ".join(
        f"{c.name} {c.accuracy:.2%}" if c.written else f"{c.name} not written ({c.note})"
        for c in candidates
    )
    return {
        "model": name,
        "test": test,
        "validation": chosen.accuracy,
        "size_kb": chosen.size_kb,
        "precision": chosen.precision + (" QAT" if chosen.quantization_aware else ""),
        "params": chosen.params,
        "macs": chosen.macs,
        "minutes": (time.perf_counter() - started) / 60,
        "detail": f"{epochs} epochs; fp32 torch {torch_accuracy:.2%}; validation: {tried}",
    }


def table(rows: list[dict], minutes: float) -> str:
    lines = [
        f"Equal time, {minutes:g} minutes each, CIFAR-10 (JPEG copy), 2M params, 300 KB; "
        f"machine: {machine()}",
        "",
        "| model | test accuracy | validation | size | params | MACs | minutes | how |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['test']:.2%} | {row['validation']:.2%} "
            f"| {row['size_kb']:.1f} KB ({row['precision']}) | {row['params']:,} "
            f"| {row['macs'] / 1e6:.1f}M | {row['minutes']:.1f} | {row['detail']} |"
        )
    by_name = {row["model"]: row for row in rows}
    anchors = [by_name[name] for name in ANCHORS if name in by_name]
    lines.append("")
    for row in rows:
        if not row["model"].startswith("compsearch"):
            continue
        if anchors:
            best = max(anchors, key=lambda anchor: anchor["test"])
            lines.append(
                f"{row['model']} - best anchor ({best['model']}): "
                f"{100 * (row['test'] - best['test']):+.2f} points"
            )
        if "random search" in by_name:
            lines.append(
                f"{row['model']} - random search: "
                f"{100 * (row['test'] - by_name['random search']['test']):+.2f} points"
            )
    return "\n".join(lines)


def variant(share: float, fidelity: str, args: argparse.Namespace) -> list[str]:
    """What sets one compsearch row apart: its search share and fidelity where several
    are compared."""
    parts = [f"search {share:.0%}"] if len(args.search_share) > 1 else []
    return parts + ([f"fidelity {fidelity}"] if len(args.fidelity) > 1 else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20, help="T: each contender's time")
    parser.add_argument("--data", type=Path, default=SHARED, help="the CIFAR-10 image folder")
    parser.add_argument(
        "--search-share", type=float, nargs="+", default=[0.5],
        help="of T, for `run`, the rest for export; several: one compsearch row each "
        "(the random search takes the first)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial")
    parser.add_argument("--rungs", type=int, default=1, help="compsearch's --rungs")
    parser.add_argument(
        "--fidelity", choices=["epochs", "seconds"], nargs="+", default=["epochs"],
        help="compsearch's --fidelity; several: one compsearch row each",
    )  # fmt: skip
    parser.add_argument(
        "--subset", type=int, default=10000, help="training images per trial (0: all)"
    )
    parser.add_argument(
        "--anchor-subset", type=int, help="train the anchors on this many images (toy checks)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--only", nargs="+", choices=["compsearch", *ANCHORS, "random"], help="run only these"
    )
    parser.add_argument("--out", type=Path, default=Path("runs-equal-time"))
    parser.add_argument("--results", type=Path, help="where the table goes")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is not a folder; give --data the CIFAR-10 image folder")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    wanted = args.only or ["compsearch", *ANCHORS, "random"]
    results = args.results or RESULTS / f"equal_time_{args.minutes:g}min.md"
    results.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/equal_time.py " + " ".join(sys.argv[1:])
    rows = []
    compsearch_rows = len(args.search_share) * len(args.fidelity)
    expected = sum(compsearch_rows if name == "compsearch" else 1 for name in wanted)

    def add(row: dict) -> None:
        """Keep a finished row, print the table so far and write it: a run cut short
        keeps the rows it finished."""
        rows.append(row)
        text = table(rows, args.minutes)
        print(text, flush=True)
        done = "" if len(rows) == expected else "\n\n(unfinished)"
        results.write_text(f"{text}\n\n`{command}`{done}\n")

    for name in wanted:
        if name == "compsearch":
            for share in args.search_share:
                for fidelity in args.fidelity:
                    parts = variant(share, fidelity, args)
                    label = "compsearch" + (f" ({', '.join(parts)})" if parts else "")
                    study = "-".join(["compsearch", *(p.split()[-1].rstrip("%") for p in parts)])
                    add(searched(study, [], args, out, share, fidelity) | {"model": label})
        elif name == "random":
            one_fidelity = ["--sampler", "random", "--no-anchors", "--rungs", "1"]
            row = searched("random", one_fidelity, args, out, args.search_share[0])
            add(row | {"model": "random search"})
        else:
            add(anchor_row(name, args, out))
    print(f"\nwritten: {results}")


if __name__ == "__main__":
    main()
