"""report.html: one self-contained page about a study, to send to a colleague.

The budgets, the dataset, how the trials went, the feasible Pareto front as a table and
as figures, and the export's verified figures when `export` has run. Figures are embedded
as PNG data, so the page needs no other file and no network.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from compsearch import __version__
from compsearch.results.records import PredictionErrors, StudySettings
from compsearch.results.table import (
    compact_amount,
    latency_label,
    outcome_counts,
    pareto_front,
    pruning_summary,
    ram_label,
    trial_label,
)
from compsearch.spaces.budgets import amount

REPORT_FILE = "report.html"
FIGURES = (
    ("pareto.png", "Accuracy against file size and parameters"),
    ("history.png", "How the search progressed"),
    ("importance.png", "Which searched parameters mattered for accuracy"),
)

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f2f2f2; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.4em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def trial_counts(frame: pd.DataFrame) -> dict[str, int]:
    """Every trial falls in exactly one of these, and they add up to `total`."""
    rejected, stopped, too_slow = outcome_counts(frame)
    trained = frame["trained"].astype(bool)
    feasible = frame["feasible"].astype(bool)
    return {
        "total": len(frame),
        "finished, within budget": int(feasible.sum()),
        "finished, over budget as measured": int((trained & ~feasible).sum()),
        "infeasible by estimate, never trained": rejected,
        "predicted too slow for the time left, never trained": too_slow,
        "stopped early": stopped,
        "failed": int((frame["state"] == "FAIL").sum()),
        "running or waiting": int(frame["state"].isin(["RUNNING", "WAITING"]).sum()),
    }


def cost_html(frame: pd.DataFrame) -> str:
    """The cost model's error over the trained trials, as a paragraph; "" without one."""
    trained = frame[frame["trained"].astype(bool)]
    errors = PredictionErrors.of_pairs(
        zip(trained["number"], trained["predicted_seconds"], trained["seconds"], strict=True)
    )
    return f'<p class="note">{html.escape(errors.describe())}</p>' if errors else ""


def table_html(header: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="number">{html.escape(cell)}</td>'
            if index in numeric
            else f"<td>{html.escape(cell)}</td>"
            for index, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def front_html(front: pd.DataFrame) -> str:
    if front.empty:
        return "<p>No feasible trial yet.</p>"
    rows = [
        [
            trial_label(row),
            f"{row['accuracy']:.2%}",
            f"{row['accuracy_before_compression']:.2%}",
            f"{int(row['params']):,}",
            f"{row['size_kb']:.1f}",
            compact_amount(row["macs"]),
            ram_label(row.get("ram_kb", math.nan)),
            latency_label(row.get("latency_ms", math.nan)),
            str(row.get("param_precision", ""))
            + (" QAT" if row.get("quantization_aware") in (True, "True") else ""),
            pruning_summary(row),
        ]
        for _, row in front.iterrows()
    ]
    header = [
        "trial", "accuracy", "fp32", "params", "size (KB)", "MACs", "RAM (KB)",
        "latency (ms)", "weights", "pruned",
    ]  # fmt: skip
    return table_html(header, rows, numeric={0, 1, 2, 3, 4, 5, 6, 7})


def export_html(card: dict[str, Any] | None) -> str:
    if card is None:
        return (
            "<p>Not exported yet: <code>compsearch export</code> retrains the best trial, "
            "verifies its file against the budgets and writes export/.</p>"
        )
    pruning = card.get("pruning", {})
    pruned = (
        f"{pruning['fraction']:.0%} {pruning['criterion']} {pruning['scope']}"
        if pruning.get("fraction")
        else "none"
    )
    teacher = card.get("teacher")
    rows = [
        ["trial", str(card["trial"])],
        [
            "test accuracy (official test split, model.onnx in onnxruntime)",
            pct(card, "test_accuracy"),
        ],
        ["validation accuracy (model.onnx)", pct(card, "validation_accuracy")],
        ["validation accuracy of the trial itself", pct(card, "trial_validation_accuracy")],
        ["torch fp32 before compression", pct(card, "accuracy_before_compression")],
        ["file size", f"{card['size_kb']:.1f} KB"],
        ["parameters", f"{card['params']:,}"],
        ["MACs", f"{card['macs']:,}"],
        ["peak activation memory (one inference)", ram_text(card.get("ram_kb"))],
        [
            "weights",
            card["precision"] + (" (quantization-aware)" if card.get("quantization_aware") else ""),
        ],
        ["pruned", pruned],
        ["epochs", str(card["epochs"])],
        ["teacher", str(teacher) if teacher else "none"],
        ["seed", str(card["seed"])],
        ["sha256 of model.onnx", card["sha256"]],
        ["created", card.get("created", "")],
    ]
    return (
        table_html(["", "export/model.onnx"], rows, numeric=set())
        + (
            '<p class="note">Every figure was measured on model.onnx itself; '
            "export/model.json holds the preprocessing that reproduces the test accuracy.</p>"
        )
        + candidates_html(card.get("candidates", []))
    )


def candidates_html(candidates: list[dict[str, Any]]) -> str:
    """The compressed files the export measured on the validation split to choose."""
    if not candidates:
        return ""
    rows = [
        [
            c["name"] + (" (chosen)" if c["chosen"] else ""),
            "" if c["validation_accuracy"] is None else f"{c['validation_accuracy']:.2%}",
            f"{c['size_kb']:.1f}",
            f"{c['params']:,}",
            "yes" if c["within_budgets"] else "no",
            c["note"],
        ]
        for c in candidates
    ]
    header = ["file", "validation accuracy", "size (KB)", "params", "within budgets", "note"]
    return "<h3>Compression candidates</h3>" + table_html(header, rows, numeric={1, 2, 3})


def ram_text(ram_kb: float | None) -> str:
    """A card's peak activation memory, or "not measured" for a card from before it was."""
    return "not measured" if ram_kb is None else f"{ram_kb:.1f} KB"


def pct(card: dict[str, Any], key: str) -> str:
    value = card.get(key)
    return "" if value is None or math.isnan(value) else f"{value:.2%}"


def figure_html(folder: Path) -> str:
    parts = []
    for name, caption in FIGURES:
        path = folder / name
        if not path.exists():
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f"<h3>{html.escape(caption)}</h3>"
            f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        )
    return "".join(parts) or "<p>No figures yet: run <code>compsearch plot</code>.</p>"


def write_report(frame: pd.DataFrame, settings: StudySettings, folder: Path, name: str) -> Path:
    """folder/report.html from the trials, the figures beside it and export/model.json."""
    card_path = folder / "export" / "model.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else None
    counts = trial_counts(frame)
    budgets = settings.budgets
    name_given, data_dir = settings.data_source
    dataset_rows = [
        ["dataset", settings.dataset],
        ["read from", "scikit-learn's bundled copy" if name_given == "digits" else data_dir],
        ["training subset", str(settings.subset or "all")],
        ["seed", str(settings.seed)],
    ]
    if card is not None:
        images = card.get("images", {})
        dataset_rows.append(
            [
                "images",
                ", ".join(f"{count:,} {split}" for split, count in images.items()),
            ]
        )
    budget_rows = [
        [label, value]
        for label, value in (
            ("parameters", budgets.params),
            ("file size (KB)", budgets.size_kb),
            ("MACs", budgets.macs),
            ("peak activation memory (KB)", budgets.ram_kb),
            ("latency (ms)", budgets.latency_ms),
        )
        if value is not None
    ]
    objectives = ", ".join(settings.objectives)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>compsearch report: {html.escape(name)}</title>
<style>{STYLE}</style></head><body>
<h1>compsearch study {html.escape(name)}</h1>
<p class="note">Written {created} by compsearch {html.escape(__version__)}.
Accuracy is top-1 on the validation split held out from the training data, measured by
running each trial's ONNX file in onnxruntime; only the export touches the test split.</p>
<h2>Budgets</h2>
{table_html(["budget", "at most"], [[k, amount(v)] for k, v in budget_rows], numeric={1})}
<h2>Dataset</h2>
{table_html(["", ""], dataset_rows, numeric=set())}
<h2>Trials</h2>
{table_html(["outcome", "trials"], [[k, str(v)] for k, v in counts.items()], numeric={1})}
{cost_html(frame)}
<h2>Feasible Pareto front (most accurate first)</h2>
<p class="note">Objectives: {html.escape(objectives)}.</p>
{front_html(pareto_front(frame))}
<h2>Export</h2>
{export_html(card)}
<h2>Figures</h2>
{figure_html(folder)}
</body></html>
"""
    path = folder / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path
