"""How well each fidelity ranks configs: Kendall's tau on CIFAR-10.

A search at a low fidelity is worth only as much as its ranking of configs agrees with
the ranking the user will see after the export. This script takes the anchors and
random configs of the space that fit 2M parameters and 300 KB (and that the cost model
predicts at most `--longest` seconds at the top rung), trains each one as a trial at
every candidate fidelity, and then as a small export: on `--truth-images` training
images (0: all) for a fixed time (`--truth-seconds`, epochs sized by the cost model, so
a slow network earns fewer epochs than a fast one), fp32 validation accuracy. It prints
Kendall's tau between each fidelity's validation accuracy (the trial's file in
onnxruntime, what the search ranks by) and that final one, and between each rung and the
next, and writes a table to bench/results/fidelity_ranking.md.

Candidate fidelities, on `--subset` training images with `--epochs` at the top:
- the three-rung ladder of search/fidelity.py (`rung r`): epochs cut first, then images;
- rung 0's cost with images cut first (`images-first 0`): all the epochs, fewer images;
- `seconds`: every config trained for the same predicted trial seconds on rung 1's
  images (what rung 1 costs the median config), epochs sized by the cost model.

    python bench/fidelity_ranking.py                 # 8 configs, about 40 min on 2 cores
    python bench/fidelity_ranking.py --configs 2 --subset 500 --truth-seconds 5 \
        --truth-images 500                           # a toy check
    python bench/fidelity_ranking.py --table-from bench/results/fidelity_ranking.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from cifar10_300kb import machine  # bench/, beside this script

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
RESULTS = Path(__file__).resolve().parent / "results" / "fidelity_ranking.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="the CIFAR-10 image folder")
    parser.add_argument("--configs", type=int, default=8, help="configs ranked, anchors first")
    parser.add_argument("--subset", type=int, default=3000, help="the search's training images")
    parser.add_argument("--epochs", type=int, default=4, help="the top rung's epochs")
    parser.add_argument("--truth-seconds", type=float, default=60, help="the export's training")
    parser.add_argument(
        "--truth-images", type=int, default=5000, help="the export's training images (0: all)"
    )
    parser.add_argument(
        "--longest", type=float, default=150, help="skip configs predicted slower at the top"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("runs-fidelity"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--start",
        type=int,
        default=0,
        help="skip the first configs of the list (a run split "
        "in two; join their .json files with --table-from)",
    )
    parser.add_argument(
        "--table-from", type=Path, nargs="+", help="only make the table from these .json files"
    )
    args = parser.parse_args()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.table_from:
        saved = [json.loads(path.read_text()) for path in args.table_from]
        rows = [row for part in saved for row in part["rows"]]
        setup = saved[0]["setup"] | {
            "command": " + ".join(part["setup"]["command"] for part in saved)
        }
        write(setup, rows, args.results)
        return

    import optuna

    from compsearch.objectives.catalog import CACHE_FOLDER
    from compsearch.objectives.data import load_dataset
    from compsearch.objectives.train import DeviceData, accuracy, predict
    from compsearch.objectives.trial import run_trial, train_model
    from compsearch.search.anchors import ANCHORS, anchor_params
    from compsearch.search.cost import calibrate, optuna_quiet
    from compsearch.search.fidelity import ladder, rung_schedule
    from compsearch.search.jobs import resolve_device
    from compsearch.search.loop import default_schedule, fit_to_budget
    from compsearch.spaces.budgets import Budgets
    from compsearch.spaces.cost import training_work
    from compsearch.spaces.estimate import estimate
    from compsearch.spaces.space import sample, space_for

    started = time.perf_counter()
    device = resolve_device(args.device)
    out = args.out.resolve()
    cache = out / CACHE_FOLDER
    source = f"folder:{args.data.resolve()}"
    full = load_dataset(
        source, seed=args.seed, subset=args.truth_images or None, cache_folder=cache
    )
    data = load_dataset(source, seed=args.seed, subset=args.subset, cache_folder=cache)
    on_full, on_device = DeviceData(full, device), DeviceData(data, device)
    classes = len(data.class_names)
    budgets = Budgets(params=2e6, size_kb=300)
    space = space_for(data.channels, classes, data.resolution)
    top_schedule = default_schedule(args.epochs, data.resolution)
    costs = calibrate(space, top_schedule, data, on_device, args.seed)

    def predicted(config, images: int) -> float:
        work = training_work(config, images, len(data.val), data.resolution, data.channels)
        return costs.predict(work)

    # The configs: the anchors (narrowed to fit, as a run queues them), then random ones
    # within the budgets that the search's cost model would let start.
    chosen: list[tuple[str, dict]] = []
    for name, anchor in ANCHORS.items():
        params = anchor_params(anchor, space)
        if params is not None:
            params = fit_to_budget(params, space, top_schedule, budgets)
        if params is not None:
            chosen.append((name, params))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    with optuna_quiet():
        while len(chosen) < args.configs:
            trial = study.ask()
            config = sample(trial, space, top_schedule)
            expected = estimate(config)
            if budgets.excess(expected.params, expected.size_kb, expected.macs, expected.ram_kb):
                continue
            if predicted(config, len(data.train)) > args.longest:
                continue
            chosen.append((f"random {trial.number}", dict(trial.params)))
    chosen = chosen[: args.configs]

    rungs = ladder(args.epochs, len(data.train), classes, rungs=3)
    bottom = rungs[0]
    fidelities = {f"rung {f.rung}": f for f in rungs}
    fidelities["images-first 0"] = dataclasses.replace(
        bottom, epochs=args.epochs, images=round(bottom.epochs * bottom.images / args.epochs)
    )
    # The seconds fidelity costs what rung 1 costs a median config.
    second = rungs[min(1, len(rungs) - 1)]
    costs_at_second = [
        predicted(
            sample(optuna.trial.FixedTrial(p), space, rung_schedule(top_schedule, second)),
            second.images,
        )
        for _, p in chosen
    ]
    seconds_budget = statistics.median(costs_at_second)
    print(
        f"{len(chosen)} configs; fidelities: "
        + "; ".join(f"{name} = {f.epochs} x {f.images}" for name, f in fidelities.items())
        + f"; seconds = {seconds_budget:.0f} s on {second.images} images; truth = "
        f"{args.truth_seconds:.0f} s on {len(full.train)} images; device {device}",
        flush=True,
    )  # fmt: skip

    def epochs_for(params: dict, seconds: float, images: int, whole_trial: bool) -> int:
        """Epochs of `images` images that the cost model fits in `seconds`: of a whole
        trial (training, compressing, measuring), or of training alone."""

        def cost(epochs: int) -> float:
            schedule = default_schedule(epochs, data.resolution)
            return predicted(sample(optuna.trial.FixedTrial(params), space, schedule), images)

        per_epoch = (cost(6) - cost(2)) / 4
        fixed = cost(2) - 2 * per_epoch if whole_trial else 0.0
        return max(2, int((seconds - fixed) / per_epoch))

    setup = {
        "shapes": {label: f"{f.epochs} x {f.images}" for label, f in fidelities.items()}
        | {"seconds": f"{seconds_budget:.0f} s x {second.images}"},
        # The rung each fidelity ranks for: the next one up.
        "next": {
            label: f"rung {f.rung + 1}"
            for label, f in fidelities.items()
            if f.rung + 1 < len(rungs)
        },
        "truth": f"{len(full.train)} training images, {args.truth_seconds:.0f} s each",
        "machine": machine(),
        "command": f"python bench/fidelity_ranking.py {' '.join(sys.argv[1:])}".strip(),
    }
    rows = []
    for index, (name, params) in enumerate(chosen):
        if index < args.start:
            continue
        row = {"config": name}
        base = sample(optuna.trial.FixedTrial(params), space, top_schedule)
        row["params"] = estimate(base).params
        for label, fidelity in fidelities.items():
            config = sample(
                optuna.trial.FixedTrial(params), space, rung_schedule(top_schedule, fidelity)
            )
            folder = out / "trials" / f"{index}-{label.replace(' ', '-')}"
            view = on_device.subset(fidelity.images)
            result = run_trial(config, data, folder, seed=args.seed + index, on_device=view)
            row[label] = result.accuracy
            row[f"{label} s"] = result.seconds
        epochs = epochs_for(params, seconds_budget, second.images, whole_trial=True)
        config = sample(
            optuna.trial.FixedTrial(params), space, default_schedule(epochs, data.resolution)
        )
        view = on_device.subset(second.images)
        folder = out / "trials" / f"{index}-seconds"
        result = run_trial(config, data, folder, seed=args.seed + index, on_device=view)
        row["seconds"], row["seconds s"] = result.accuracy, result.seconds
        epochs = epochs_for(params, args.truth_seconds, len(full.train), whole_trial=False)
        config = sample(
            optuna.trial.FixedTrial(params), space, default_schedule(epochs, data.resolution)
        )
        began = time.perf_counter()
        model, _ = train_model(config, on_full, seed=args.seed + index)
        row["truth"] = accuracy(
            predict(model, on_full.val, on_full, data.resolution), on_full.val.labels
        )
        row["truth s"], row["truth epochs"] = time.perf_counter() - began, epochs
        rows.append(row)
        # Kept as they come, for a table of the configs done so far (`--table-from`).
        args.results.with_suffix(".json").write_text(
            json.dumps({"setup": setup, "rows": rows}, indent=1)
        )
        print(
            f"{name}: "
            + ", ".join(f"{key} {value:.2%}" for key, value in row.items()
                        if key not in ("config", "params") and not key.endswith(" s")
                        and key != "truth epochs")
            + f" ({epochs} truth epochs, {time.perf_counter() - started:.0f} s so far)",
            flush=True,
        )  # fmt: skip

    write(setup, rows, args.results)
    print(f"({(time.perf_counter() - started) / 60:.1f} min)")


def write(setup: dict, rows: list[dict], results: Path) -> None:
    """The table, from the setup and the rows (kept in RESULTS.json as they come)."""
    from scipy.stats import kendalltau

    results.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    labels = list(setup["shapes"])
    truth = [row["truth"] for row in rows]

    def tau(label: str, other: list[float]) -> str:
        return f"{kendalltau([row[label] for row in rows], other).statistic:+.2f}"

    lines = [
        f"Kendall's tau of each fidelity's ranking of {len(rows)} configs against the "
        f"export's ({setup['truth']}, epochs sized by the cost model, fp32 validation "
        f"accuracy); CIFAR-10 (JPEG copy), 2M params / 300 KB; machine: {setup['machine']}",
        "",
        "| fidelity | epochs x images | mean seconds | tau vs export | tau vs next rung |",
        "|---|---|---|---|---|",
    ]
    for label in labels:
        following = setup["next"].get(label)
        against_next = tau(label, [row[following] for row in rows]) if following else ""
        seconds = statistics.mean(row[f"{label} s"] for row in rows)
        lines.append(
            f"| {label} | {setup['shapes'][label]} | {seconds:.0f} | {tau(label, truth)} "
            f"| {against_next} |"
        )
    lines += [
        "",
        "| config | params | " + " | ".join(labels) + " | export |",
        "|---" * (len(labels) + 3) + "|",
    ]
    for row in rows:
        lines.append(
            f"| {row['config']} | {row['params']:,.0f} | "
            + " | ".join(f"{row[label]:.2%}" for label in labels)
            + f" | {row['truth']:.2%} ({row['truth epochs']} epochs) |"
        )
    lines += ["", f"`{setup['command']}`", ""]
    text = "\n".join(lines)
    results.write_text(text)
    print(f"\n{text}\nwritten: {results}")


if __name__ == "__main__":
    main()
