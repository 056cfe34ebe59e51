"""Trials as a table, the feasible Pareto front, and their rich rendering."""

from __future__ import annotations

import math

import optuna
import pandas as pd
from rich.table import Table

from compsearch.results.records import (
    DEFAULT_OBJECTIVES,
    at_top_fidelity,
    objective_columns,
    read_trials,
    study_objective_columns,
)
from compsearch.spaces.budgets import Budgets

COLUMNS = [
    "number",
    "anchor",
    "rung",
    "epochs",
    "train_images",
    "fidelity_seconds",
    "promoted_from",
    "top_fidelity",
    "state",
    "feasible",
    "trained",
    "accuracy",
    "accuracy_before_compression",
    "accuracy_post_training",
    "quantization_aware",
    "params",
    "size_kb",
    "macs",
    "ram_kb",
    "latency_ms",
    "seconds",
    "train_seconds",
    "predicted_seconds",
    "reason",
    "estimated_params",
    "estimated_size_kb",
    "estimated_macs",
    "estimated_ram_kb",
    "estimated_latency_ms",
    "early_accuracy",
    "fitted_from",
    "retry_of",
    "worker",
    "onnx_path",
    "tflite_path",
    "onnx_accuracy",
    "tflite_seconds",
]


def trials_frame(study: optuna.Study, budgets: Budgets) -> pd.DataFrame:
    """One row per trial (see TrialRecord); every searched parameter as `param_<name>`.
    `rung` counts from 1 (the cheapest); `fidelity_seconds` is the rung's predicted
    seconds when the rungs count seconds (`--fidelity seconds`); `top_fidelity` marks the
    feasible trials trained at the highest fidelity reached, the ones the front compares."""
    rows = []
    records = read_trials(study.get_trials(deepcopy=False))
    top = {record.number for record in at_top_fidelity(records, budgets)}
    computed = ("feasible", "epochs", "top_fidelity")
    for record in records:
        row = {name: getattr(record, name) for name in COLUMNS if name not in computed}
        row["feasible"] = record.feasible(budgets)
        row["top_fidelity"] = record.number in top
        row["rung"] = record.rung + 1
        row["epochs"] = record.config.train.epochs if record.config else math.nan
        for name in ("fitted_from", "retry_of", "quantization_aware", "train_images",
                     "fidelity_seconds", "promoted_from"):  # fmt: skip
            if row[name] is None:
                row[name] = math.nan
        row["worker"] = row["worker"] or math.nan
        row["onnx_path"] = row["onnx_path"] or math.nan
        for name, value in record.searched.items():
            row[f"param_{name}"] = value
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=COLUMNS)
    else:
        params = sorted(c for c in frame.columns if c.startswith("param_"))
        frame = frame[COLUMNS + params]
    frame.attrs["objectives"] = study_objective_columns(study)
    return frame


def pareto_front(frame: pd.DataFrame, objectives: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Feasible trials at the highest fidelity reached that no other such trial beats on
    every objective (`objectives`, columns: by default the frame's, from trials_frame:
    accuracy and size_kb, and latency_ms when the study optimizes it): like with like,
    when lower rungs trained less. Most accurate first."""
    columns = list(
        objectives or frame.attrs.get("objectives") or objective_columns(DEFAULT_OBJECTIVES)
    )
    feasible = frame[frame["feasible"].astype(bool) & frame["top_fidelity"].astype(bool)]
    # Every objective as a cost to minimize.
    costs = feasible[columns].astype(float) * [-1.0 if c == "accuracy" else 1.0 for c in columns]
    keep = []
    for index, row in costs.iterrows():
        no_worse = (costs <= row).all(axis=1)
        better = (costs < row).any(axis=1)
        if not (no_worse & better).any():
            keep.append(index)
    front = feasible.loc[keep].sort_values(["accuracy", "size_kb"], ascending=[False, True])
    front.attrs["objectives"] = tuple(columns)
    return front


def outcome_counts(frame: pd.DataFrame) -> tuple[int, int, int]:
    """(trials over budget before training, trials stopped early, trials predicted too
    slow for the time left), from their reasons."""
    reasons = frame["reason"].fillna("").astype(str)
    return (
        int(reasons.str.startswith("over budget before training").sum()),
        int(reasons.str.startswith("stopped early").sum()),
        int(reasons.str.startswith("too slow for the time left").sum()),
    )


def study_counts(frame: pd.DataFrame) -> str:
    """How the study's trials went, with the fraction of sampled configs over budget."""
    total = len(frame)
    if total == 0:
        return "no trials yet"
    rejected, stopped, too_slow = outcome_counts(frame)
    trained = int(frame["trained"].sum())
    failed = int((frame["state"] == "FAIL").sum())
    text = (
        f"{total} trials: {trained} trained ({int(frame['feasible'].sum())} feasible), "
        f"{rejected} infeasible before training ({rejected / total:.0%} of sampled configs, "
        f"never trained)"
    )
    if too_slow:
        text += f", {too_slow} predicted too slow for the time left (never trained)"
    if stopped:
        text += f", {stopped} stopped early"
    if failed:
        text += f", {failed} failed"
    return text


def trial_label(row: pd.Series) -> str:
    """ "12", or "0 resnet8" for an anchor: the trial as tables name it."""
    anchor = row.get("anchor")
    return f"{row['number']} {anchor}" if isinstance(anchor, str) and anchor else str(row["number"])


def rung_label(row: pd.Series) -> str:
    """ "2 (from 7)": the rung of a trial, from 1, and the trial it was promoted from."""
    text = str(int(row["rung"]))
    promoted = row.get("promoted_from")
    return text + (f" (from {int(promoted)})" if promoted == promoted else "")


def compact_amount(value: float) -> str:
    """500, 20k, 1.72M: short enough for tables and tick labels."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:g}"


def front_table(front: pd.DataFrame, title: str) -> Table:
    """The front as `show` prints it; with latency an objective (the front's attrs say so,
    as pareto_front leaves them), a column of milliseconds in place of the accuracy
    before compression, so that the table still fits 80 columns."""
    latency = "latency_ms" in front.attrs.get("objectives", ())
    paths = front["tflite_path"] if "tflite_path" in front else pd.Series(dtype=str)
    tflite = bool(paths.fillna("").astype(str).str.len().gt(0).any())  # run --format tflite
    table = Table(
        title=title,
        caption="accuracy: the "
        + ("`.tflite` file in LiteRT" if tflite else "ONNX file in onnxruntime")
        + ", validation split; "
        + (
            "ms: median single-image latency, one thread"
            if latency
            else "fp32: the torch model before compression"
        )
        + "; RAM: peak activation memory, KB",
    )
    columns = [
        ("trial", "right"),
        ("accuracy", "right"),
        ("ms" if latency else "fp32", "right"),
        ("params", "right"),
        ("size_kb", "right"),
        ("MACs", "right"),
        ("RAM", "right"),
        ("weights", "left"),
        ("pruned", "right"),
    ]
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for _, row in front.iterrows():
        table.add_row(
            trial_label(row),
            f"{row['accuracy']:.2%}",
            latency_label(row.get("latency_ms", math.nan))
            if latency
            else f"{row['accuracy_before_compression']:.2%}",
            f"{int(row['params']):,}",
            f"{row['size_kb']:.1f}",
            compact_amount(row["macs"]),
            ram_label(row.get("ram_kb", math.nan)),
            str(row.get("param_precision", ""))
            + (" QAT" if row.get("quantization_aware") in (True, "True") else ""),
            pruning_summary(row),
        )
    return table


def latency_label(latency_ms: float) -> str:
    """Milliseconds to three significant digits, or "-" when not measured."""
    return "-" if latency_ms != latency_ms else f"{latency_ms:.3g}"


def ram_label(ram_kb: float) -> str:
    """Peak activation memory in KB, or "-" for a study from before it was measured."""
    return "-" if ram_kb != ram_kb else f"{ram_kb:.1f}"


def pruning_summary(row: pd.Series) -> str:
    """ "30% l2 global": the share of parameters pruned and how, or "none"."""
    fraction = row.get("param_prune_fraction", 0)
    if not isinstance(fraction, float | int) or math.isnan(fraction) or fraction <= 0:
        return "none"
    how = f"{row.get('param_prune_criterion', '')} {row.get('param_prune_scope', '')}"
    return f"{fraction:.0%} {how}".strip()


def all_trials_table(frame: pd.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for name in ("trial", "rung", "state", "feasible", "accuracy", "params", "size_kb", "reason"):
        table.add_column(name)
    for _, row in frame.iterrows():
        table.add_row(
            trial_label(row),
            rung_label(row),
            row["state"],
            "yes" if row["feasible"] else "no",
            "" if math.isnan(row["accuracy"]) else f"{row['accuracy']:.2%}",
            "" if math.isnan(row["params"]) else f"{int(row['params']):,}",
            "" if math.isnan(row["size_kb"]) else f"{row['size_kb']:.1f}",
            row["reason"],
        )
    return table


def hypervolume(points: list[tuple[float, float]], budget_kb: float) -> float:
    """Share of the box [0, budget_kb] x [0, 100% accuracy] that (size_kb, accuracy) points
    dominate: 0 for none, 1 for a perfect model of no size."""
    area = 0.0
    reached = 0.0
    # Sweeping from the smallest file, each point adds the accuracy it gains over every
    # smaller point, for all sizes from its own up to the budget.
    for size_kb, accuracy in sorted(points):
        if size_kb <= budget_kb and accuracy > reached:
            area += (1 - size_kb / budget_kb) * (accuracy - reached)
            reached = accuracy
    return area


def search_history(frame: pd.DataFrame, budgets: Budgets) -> pd.DataFrame:
    """After each trial, in trial-number order: the best feasible accuracy so far and the
    hypervolume of the feasible trials so far (see `hypervolume`)."""
    rows = []
    points: list[tuple[float, float]] = []
    for _, row in frame.sort_values("number").iterrows():
        if row["feasible"]:
            points.append((float(row["size_kb"]), float(row["accuracy"])))
        rows.append(
            {
                "number": int(row["number"]),
                "best_accuracy": max((a for _, a in points), default=math.nan),
                "hypervolume": hypervolume(points, budgets.size_kb),
            }
        )
    return pd.DataFrame(rows, columns=["number", "best_accuracy", "hypervolume"])


MIN_TRIALS_FOR_IMPORTANCE = 4  # trained trials below which importances are noise


def accuracy_importance(study: optuna.Study, seed: int = 0) -> pd.Series:
    """fANOVA importance of each searched parameter for accuracy, over trained trials only
    (configs rejected before training carry a placeholder accuracy). Empty when fewer than
    MIN_TRIALS_FOR_IMPORTANCE trials were trained."""
    trials = study.get_trials(deepcopy=False)
    trained = [
        trial for trial, record in zip(trials, read_trials(trials), strict=True) if record.trained
    ]
    if len(trained) < MIN_TRIALS_FOR_IMPORTANCE:
        return pd.Series(dtype=float)
    # A study of the trained trials alone, so the evaluator sees no placeholder.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        copy = optuna.create_study(directions=study.directions)
        copy.add_trials(trained)
        importances = optuna.importance.get_param_importances(
            copy,
            evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
            target=lambda trial: trial.values[0],
        )
    finally:
        optuna.logging.set_verbosity(verbosity)
    return pd.Series(importances, dtype=float).sort_values(ascending=False)
