"""How fast each sampler finds a good front: hypervolume of the feasible front by trial count.

Every variant runs the real search (`compsearch.search.run.search`: sampling, budget
checks, training, pruning, ONNX export, accuracy in onnxruntime) on a cheap real task,
digits with a short schedule, for several seeds, in an in-memory Optuna study. After
each finished trial it records the hypervolume of the feasible front in (accuracy,
size_kb): the area dominated between the reference point (accuracy 0, size_kb = the
budget) and the front, divided by the budget, so 1.0 would be 100% accuracy at 0 KB.

Variants: the samplers (tpe, nsga2, gp, random for twice the trials), multivariate
tpe (`tpe-multivariate`), and tpe or random with a shrunk copy of
every over-budget proposal queued (`+fit`) or with early stopping (`+stop`).

    python bench/search_efficiency.py                      # all variants, 3 seeds
    python bench/search_efficiency.py --variants tpe,random2x --seeds 5 --trials 30
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# name: (sampler, trials multiplier, fit to budget, early stopping)
VARIANTS = {
    "tpe": ("tpe", 1, False, False),
    "tpe-multivariate": ("tpe-multivariate", 1, False, False),
    "tpe+fit": ("tpe", 1, True, False),
    "tpe+stop": ("tpe", 1, False, True),
    "tpe+fit+stop": ("tpe", 1, True, True),
    "nsga2": ("nsga2", 1, False, False),
    "gp": ("gp", 1, False, False),
    "random2x": ("random", 2, False, False),
    "random2x+fit": ("random", 2, True, False),
}


@dataclass(frozen=True)
class Job:
    variant: str
    seed: int
    trials: int
    epochs: int
    budget_params: float
    budget_kb: float


def hypervolume(points: list[tuple[float, float]], budget_kb: float) -> float:
    """Area dominated by (accuracy, size_kb) points, up to (0, budget_kb), over budget_kb."""
    front = sorted((p for p in points if p[1] <= budget_kb), key=lambda p: p[1])
    area, best = 0.0, 0.0
    for index, (accuracy, size) in enumerate(front):
        best = max(best, accuracy)  # the best accuracy at this size or smaller
        next_size = front[index + 1][1] if index + 1 < len(front) else budget_kb
        area += best * (next_size - size)
    return area / budget_kb


def run_job(job: Job) -> dict:
    import optuna
    import torch

    from compsearch.objectives.data import load_dataset
    from compsearch.objectives.trial import check_epoch
    from compsearch.search.loop import SearchSettings, default_schedule, search
    from compsearch.search.study import DIRECTIONS, make_sampler
    from compsearch.spaces.budgets import Budgets
    from compsearch.spaces.space import space_for

    torch.set_num_threads(1)  # one core per job; jobs run side by side
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sampler_name, multiplier, fit, stop = VARIANTS[job.variant]
    data = load_dataset("digits", seed=job.seed)
    space = space_for(data.channels, data.num_classes, data.resolution)
    schedule = default_schedule(job.epochs, data.resolution)
    budgets = Budgets(params=job.budget_params, size_kb=job.budget_kb)
    if sampler_name == "tpe-multivariate":  # one joint density, for comparison
        sampler = optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=job.seed)
    else:
        sampler = make_sampler(sampler_name, job.seed)
    study = optuna.create_study(directions=list(DIRECTIONS), sampler=sampler)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        settings = SearchSettings(
            budgets,
            job.trials * multiplier,
            None,
            job.seed,
            "cpu",
            Path(folder),
            fit_after_rejections=1 if fit else 0,
            early_stopping=stop,
        )
        counts = search(study, space, schedule, data, settings, console=None)
    seconds = time.perf_counter() - started
    # The hypervolume after each finished trial (trained or stopped early), in order.
    points, curve, epochs_curve, epochs = [], [], [], 0
    for trial in study.trials:
        attrs = trial.user_attrs
        stopped = trial.state == optuna.trial.TrialState.PRUNED
        if not (attrs.get("trained") and trial.state.name == "COMPLETE") and not stopped:
            continue
        if stopped:
            epochs += check_epoch(schedule)
        else:
            epochs += job.epochs
            if not budgets.excess(attrs["params"], attrs["size_kb"], attrs["macs"]):
                points.append((trial.values[0], attrs["size_kb"]))
        curve.append(hypervolume(points, job.budget_kb))
        epochs_curve.append(epochs)
    return {
        "variant": job.variant,
        "seed": job.seed,
        "curve": curve,
        "epochs": epochs_curve,
        "asked": len(study.trials),
        "rejected": counts.rejected,
        "fitted": counts.fitted,
        "stopped": counts.stopped_early,
        "seconds": seconds,
    }


def summarize(results: list[dict], trials: int, checkpoints: list[int]) -> None:
    variants = list(dict.fromkeys(r["variant"] for r in results))
    header = "".join(f"{f'HV@{k}':>16}" for k in checkpoints)
    print(f"\n{'variant':<14}{header}{'infeasible':>12}{'epochs@N':>10}{'minutes':>9}")
    for variant in variants:
        runs = [r for r in results if r["variant"] == variant]
        cells = []
        for k in checkpoints:
            values = [r["curve"][k - 1] for r in runs if len(r["curve"]) >= k]
            if len(values) == len(runs):
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.4f}±{spread:.4f}")
            else:
                cells.append("")
        infeasible = sum(r["rejected"] for r in runs) / max(1, sum(r["asked"] for r in runs))
        epochs = statistics.mean(r["epochs"][min(trials, len(r["epochs"])) - 1] for r in runs)
        minutes = statistics.mean(r["seconds"] for r in runs) / 60
        print(
            f"{variant:<14}{''.join(f'{c:>16}' for c in cells)}"
            f"{infeasible:>11.0%}{epochs:>10.0f}{minutes:>9.1f}"
        )
    by_variant = {v: [r for r in results if r["variant"] == v] for v in variants}
    if "tpe" in by_variant and "random2x" in by_variant:
        tpe = statistics.mean(r["curve"][trials - 1] for r in by_variant["tpe"])
        random = statistics.mean(r["curve"][2 * trials - 1] for r in by_variant["random2x"])
        verdict = "reached" if tpe >= random else "did not reach"
        print(
            f"\ngoal: tpe after {trials} trials {tpe:.4f} vs random after {2 * trials} "
            f"{random:.4f}: {verdict}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--trials", type=int, default=20, help="N: finished trials per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial")
    parser.add_argument("--budget-params", type=float, default=50e3)
    parser.add_argument("--budget-kb", type=float, default=50.0)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one core each")
    parser.add_argument("--json", type=Path, help="also write every curve here")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    jobs = [
        Job(v, seed, args.trials, args.epochs, args.budget_params, args.budget_kb)
        for seed in range(args.seeds)
        for v in variants
    ]
    print(
        f"digits, {args.epochs} epochs per trial, budgets {args.budget_params:g} params and "
        f"{args.budget_kb:g} KB, {args.seeds} seeds, N = {args.trials}; hypervolume of the "
        f"feasible front, reference point (accuracy 0, {args.budget_kb:g} KB), over "
        f"{args.budget_kb:g} KB; {len(jobs)} runs, {args.jobs} at a time",
        flush=True,
    )
    results = []
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs, maxtasksperchild=1) as pool:
        for result in pool.imap_unordered(run_job, jobs):
            results.append(result)
            print(
                f"  {result['variant']} seed {result['seed']}: HV {result['curve'][-1]:.4f} "
                f"after {len(result['curve'])} trials, {result['seconds']:.0f} s",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results))
    step = max(5, args.trials // 4)
    checkpoints = sorted(
        set(range(step, 2 * args.trials + 1, step)) | {args.trials, 2 * args.trials}
    )
    summarize(results, args.trials, checkpoints)


if __name__ == "__main__":
    main()
