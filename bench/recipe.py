"""Recipe: what each training ingredient is worth at a fixed number of epochs, CIFAR-10.

Each ingredient is tried alone on top of today's trainer, beside a baseline run of the
same network and seed (the same initialization, the same augmentation draws): its gain is
the difference in test accuracy of the exported fp32 file in onnxruntime, its cost the
difference in training seconds. Networks: ResNet-8 (the anchor exactly as `compsearch
run` queues it) and a network the search found (`--found`, a trial's Optuna parameters
as JSON; default bench/found_network.json). Schedules are the search's default
(`default_schedule`: Nesterov SGD, batch 64, learning rate 0.1, label smoothing 0.1, a
quarter of the epochs fine-tuning at the test resolution after pruning).

Ingredients (names for `--ingredients` and `--keep`):

- `batch128`, `batch256`: batch 128 (256) with the learning rate scaled with it (0.2, 0.4)
- `no-smoothing`: label smoothing 0 instead of 0.1 (today's trainer smooths)
- `lr0.05`, `lr0.2`: peak learning rate 0.05 (0.2) instead of 0.1, batch 64
- `decay1e-3`, `decay2.5e-4`: weight decay 1e-3 (2.5e-4) instead of 5e-4
- `average`: an exponential moving average of the weights, horizon 5% of a phase's steps
- `no-norm-decay`: no weight decay on batch-norm parameters and biases
- `zero-residual`: the last batch norm of every residual branch starts at zero
- `whiten`: the stem's filters start as the whitened principal directions of image patches
- `adamw`: AdamW (learning rate 2e-3, decoupled weight decay 0.05) instead of SGD
- `translate`, `translate2`: images translated by at most 1/8 of their side (4 px at 32
  px, the trainer's default until no translation measured better) or 1/16 (2 px);
  `no-translate`: not at all, today's default (so beside today's baseline it changes
  nothing; the tables that show it were measured with 1/8 as the baseline)
- `alternating-flip`: each image flipped in every other epoch (a random half in the first
  epoch, the others in the next) instead of a fresh coin per image and epoch, as airbench
- `flip`: horizontal-flip test-time augmentation inside the file (no training of its own:
  the baseline's model, wrapped; its MACs doubled)

Two modes. The screen (default): a 10,000-image training subset, 8 epochs, 2 seeds, every
ingredient. `--compare`: today's recipe against today's with the `--keep` ingredients,
on the whole training set, 10 epochs, 3 seeds, both in one run (with flip among other
kept ingredients, also the baseline's model flip-averaged alone). Results go to
bench/results/recipe_<mode>.md and .json, rewritten after every run, so a run cut short
keeps what it finished.

    python bench/recipe.py                                          # the screen
    python bench/recipe.py --compare --keep average no-norm-decay   # the comparison
    python bench/recipe.py --subset 500 --test-subset 500 --epochs 2 --seeds 1 \\
        --networks resnet8 --ingredients average flip               # a toy check
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from cifar10_300kb import machine  # bench/, beside this script

from compsearch.objectives.catalog import CACHE_FOLDER
from compsearch.objectives.compress import FlipAveraged, export
from compsearch.objectives.data import Dataset, Split, load_dataset
from compsearch.objectives.measure import count_macs, count_params, onnx_accuracy
from compsearch.objectives.train import DeviceData, Recipe, spread_sample
from compsearch.objectives.trial import train_model
from compsearch.search.anchors import ANCHORS, anchor_params
from compsearch.search.jobs import resolve_device
from compsearch.search.loop import default_schedule
from compsearch.spaces.config import TrainConfig, TrialConfig
from compsearch.spaces.space import sample, space_for

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data" / "cifar10-jpeg"
RESULTS = HERE / "results"
FOUND = HERE / "found_network.json"

# An ingredient changes the schedule, the recipe, or (flip) only the exported file.
Change = Callable[[TrainConfig, Recipe], tuple[TrainConfig, Recipe]]


def schedule_change(**fields: float) -> Change:
    return lambda train, recipe: (dataclasses.replace(train, **fields), recipe)


def recipe_change(**fields: object) -> Change:
    return lambda train, recipe: (train, dataclasses.replace(recipe, **fields))


INGREDIENTS: dict[str, Change | None] = {
    "batch128": schedule_change(batch_size=128, learning_rate=0.2),
    "batch256": schedule_change(batch_size=256, learning_rate=0.4),
    "no-smoothing": schedule_change(label_smoothing=0.0),
    "lr0.05": schedule_change(learning_rate=0.05),
    "lr0.2": schedule_change(learning_rate=0.2),
    "decay1e-3": schedule_change(weight_decay=1e-3),
    "decay2.5e-4": schedule_change(weight_decay=2.5e-4),
    "average": recipe_change(average_fraction=0.05),
    "no-norm-decay": recipe_change(decay_norms=False),
    "zero-residual": recipe_change(zero_init_residual=True),
    "whiten": recipe_change(whiten_stem=True),
    "adamw": recipe_change(optimizer="adamw"),
    "translate": recipe_change(translation=1 / 8),  # 4 px at 32 px: the earlier default
    "translate2": recipe_change(translation=1 / 16),  # 2 px at 32 px
    "no-translate": recipe_change(translation=0.0),  # today's default: the baseline itself
    "alternating-flip": recipe_change(alternating_flip=True),
    "flip": None,  # the baseline's model, flip-averaged in the file
}


def network_config(name: str, data: Dataset, epochs: int, found: Path) -> TrialConfig:
    """ResNet-8 as `compsearch run` queues it, or the found network, at `epochs`."""
    space = space_for(data.channels, len(data.class_names), data.resolution)
    schedule = default_schedule(epochs, data.resolution)
    if name == "resnet8":
        params = anchor_params(ANCHORS["resnet8"], space)
    else:
        params = json.loads(found.read_text())["params"]
    return sample(optuna.trial.FixedTrial(params), space, schedule)


def measure(
    model: torch.nn.Module, config: TrialConfig, data: Dataset, test: Split, folder: Path
) -> dict:
    """The fp32 file's test accuracy in onnxruntime, its params and MACs."""
    resolution = config.train.test_resolution
    model = copy.deepcopy(model).cpu().eval()
    path = export(model, "fp32", resolution, data.channels, folder / "model.onnx")
    return {
        "test": onnx_accuracy(path, test, data, resolution),
        "params": count_params(model),
        "macs": count_macs(model, data.channels, resolution),
    }


def run_one(
    network: str,
    config: TrialConfig,
    ingredient: str,
    seed: int,
    data: Dataset,
    on_device: DeviceData,
    test: Split,
    keep: list[str],
) -> tuple[dict, torch.nn.Module]:
    """Train `config` with `ingredient` (or "baseline", or "kept": every `--keep`) on top
    of today's trainer; the row of figures and the trained model."""
    train, recipe = config.train, Recipe()
    names = ingredient_names(ingredient, keep)
    for name in names:
        change = INGREDIENTS.get(name)
        if change is not None:
            train, recipe = change(train, recipe)
    config = dataclasses.replace(config, train=train)
    started = time.perf_counter()
    model, deployed = train_model(config, on_device, seed=seed, recipe=recipe)
    seconds = time.perf_counter() - started
    deployed_model = FlipAveraged(model) if "flip" in names else model
    with tempfile.TemporaryDirectory() as folder:
        figures = measure(deployed_model, deployed, data, test, Path(folder))
    row = {
        "network": network,
        "ingredient": ingredient,
        "seed": seed,
        "epochs": train.epochs,
        "train_seconds": seconds,
        "seconds_per_epoch": seconds / train.epochs,
    } | figures
    return row, model


def ingredient_names(ingredient: str, keep: list[str]) -> list[str]:
    """The ingredients a row applies: every `--keep` for "kept", else itself."""
    return keep if ingredient == "kept" else [ingredient]


def trains(ingredient: str, keep: list[str]) -> bool:
    """Whether the row needs a training of its own (flip alone changes only the file)."""
    return any(INGREDIENTS.get(name) is not None for name in ingredient_names(ingredient, keep))


def flip_row(
    baseline: dict,
    model: torch.nn.Module,
    config: TrialConfig,
    data: Dataset,
    test: Split,
    ingredient: str = "flip",
) -> dict:
    """The baseline's model with flip test-time augmentation folded into its file."""
    with tempfile.TemporaryDirectory() as folder:
        figures = measure(FlipAveraged(model), config, data, test, Path(folder))
    return baseline | {"ingredient": ingredient} | figures


def summary(rows: list[dict], reference: str) -> list[dict]:
    """Per network and ingredient: the mean gain over `reference` runs of the same seed,
    its spread (lowest and highest), and the mean cost in training seconds."""
    by_key = {(r["network"], r["ingredient"], r["seed"]): r for r in rows}
    out = []
    for network in dict.fromkeys(r["network"] for r in rows):
        for ingredient in dict.fromkeys(r["ingredient"] for r in rows):
            pairs = [
                (r, by_key[(network, reference, r["seed"])])
                for r in rows
                if r["network"] == network
                and r["ingredient"] == ingredient
                and (network, reference, r["seed"]) in by_key
            ]
            if not pairs:
                continue
            gains = [100 * (r["test"] - base["test"]) for r, base in pairs]
            costs = [r["train_seconds"] - base["train_seconds"] for r, base in pairs]
            out.append(
                {
                    "network": network,
                    "ingredient": ingredient,
                    "runs": len(pairs),
                    "test": statistics.mean(r["test"] for r, _ in pairs),
                    "gain": statistics.mean(gains),
                    "low": min(gains),
                    "high": max(gains),
                    "seconds": statistics.mean(r["train_seconds"] for r, _ in pairs),
                    "cost": statistics.mean(costs),
                    "macs": pairs[0][0]["macs"],
                }
            )
    return out


def table(rows: list[dict], reference: str, heading: str) -> str:
    lines = [
        heading,
        "",
        f"| network | ingredient | runs | test accuracy | gain over {reference} (low, high) "
        "| train seconds | cost | MACs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary(rows, reference):
        lines.append(
            f"| {s['network']} | {s['ingredient']} | {s['runs']} | {s['test']:.2%} "
            f"| {s['gain']:+.2f} ({s['low']:+.2f}, {s['high']:+.2f}) | {s['seconds']:.0f} "
            f"| {s['cost']:+.0f} s | {s['macs'] / 1e6:.1f}M |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="the CIFAR-10 image folder")
    parser.add_argument("--compare", action="store_true", help="today's recipe against --keep")
    parser.add_argument("--keep", nargs="+", default=[], choices=list(INGREDIENTS))
    parser.add_argument("--ingredients", nargs="+", choices=list(INGREDIENTS))
    parser.add_argument("--networks", nargs="+", default=["resnet8", "found"])
    parser.add_argument("--found", type=Path, default=FOUND, help="the found network's JSON")
    parser.add_argument("--subset", type=int, help="training images (screen: 10,000)")
    parser.add_argument("--test-subset", type=int, help="test images (toy checks)")
    parser.add_argument("--epochs", type=int, help="screen: 8, compare: 10")
    parser.add_argument("--seeds", type=int, help="screen: 2, compare: 3")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", type=Path, help="the table's .md (the .json beside it)")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} is not a folder; give --data the CIFAR-10 image folder")
    if args.compare and not args.keep:
        raise SystemExit("--compare needs --keep: the ingredients to compare with today's")
    if "found" in args.networks and not args.found.is_file():
        raise SystemExit(f"{args.found} is missing; give --found a trial's parameters as JSON")
    mode = "compare" if args.compare else "screen"
    subset = args.subset if args.subset is not None else (None if args.compare else 10_000)
    epochs = args.epochs or (10 if args.compare else 8)
    seeds = args.seeds or (3 if args.compare else 2)
    ingredients = args.ingredients or list(INGREDIENTS)
    if args.compare:  # with flip kept beside training changes, flip alone costs one file
        flip_too = "flip" in args.keep and len(args.keep) > 1
        ingredients = ["kept"] + (["flip"] if flip_too else [])
    results = args.results or RESULTS / f"recipe_{mode}.md"
    results.parent.mkdir(parents=True, exist_ok=True)

    device = resolve_device(args.device)
    data = load_dataset(
        f"folder:{args.data.resolve()}", seed=0, subset=subset,
        cache_folder=Path(tempfile.gettempdir()) / "compsearch-bench" / CACHE_FOLDER,
    )  # fmt: skip
    test = data.test
    if args.test_subset is not None:  # a fixed random draw: the folder is ordered by class
        index = spread_sample(args.test_subset, len(data.test))
        test = Split(data.test.images[index], data.test.labels[index])
    on_device = DeviceData(data, device)
    heading = (
        f"Recipe {mode}, CIFAR-10 (JPEG copy), {len(data.train):,} training images, "
        f"{epochs} epochs, {seeds} seeds, test accuracy of the fp32 file in onnxruntime "
        f"({len(test):,} test images); machine: {machine()}"
        + (f"; kept: {', '.join(args.keep)}" if args.compare else "")
    )
    command = "python bench/recipe.py " + " ".join(sys.argv[1:])
    rows: list[dict] = []

    def record(row: dict, baseline: dict) -> None:
        rows.append(row)
        print(
            f"{row['network']} seed {row['seed']} {row['ingredient']}: {row['test']:.2%} "
            f"({baseline['test']:.2%} baseline), {row['train_seconds']:.0f} s",
            flush=True,
        )
        results.write_text(f"{table(rows, 'baseline', heading)}\n\n`{command}`\n")
        results.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")

    # Every seed's baseline first, then each ingredient on every seed: a run cut short
    # keeps whole pairs for the ingredients it reached.
    for network in args.networks:
        config = network_config(network, data, epochs, args.found)
        baselines = []
        for seed in range(seeds):
            baseline, model = run_one(
                network, config, "baseline", seed, data, on_device, test, args.keep
            )
            baselines.append((baseline, model))
            record(baseline, baseline)
        for ingredient in ingredients:
            for seed, (baseline, model) in enumerate(baselines):
                if not trains(ingredient, args.keep):  # the baseline's model, flip-averaged
                    row = flip_row(baseline, model, config, data, test, ingredient)
                else:
                    row, _ = run_one(
                        network, config, ingredient, seed, data, on_device, test, args.keep,
                    )  # fmt: skip
                record(row, baseline)
    text = table(rows, "baseline", heading)
    print(text)
    print(f"written: {results}")


if __name__ == "__main__":
    main()
