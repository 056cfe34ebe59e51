"""pareto.png (matplotlib) and pareto.html (plotly): accuracy against size and params."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from compsearch.results.table import compact_amount, outcome_counts, pareto_front
from compsearch.spaces.budgets import Budgets, amount

AXES = (("size_kb", "ONNX file size (KB)", "size_kb"), ("params", "parameters", "params"))


def write_png(frame: pd.DataFrame, budgets: Budgets, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    trained = frame[frame["trained"].astype(bool)]
    feasible = trained[trained["feasible"].astype(bool)]
    infeasible = trained[~trained["feasible"].astype(bool)]
    front = pareto_front(frame)
    rejected, stopped = outcome_counts(frame)
    figure, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    compact = FuncFormatter(lambda value, _: compact_amount(value))
    for axis, (column, label, budget_name) in zip(axes, AXES, strict=True):
        axis.scatter(
            feasible[column],
            feasible["accuracy"] * 100,
            s=28,
            color="tab:blue",
            label=f"feasible ({len(feasible)})",
            zorder=3,
        )
        axis.scatter(
            infeasible[column],
            infeasible["accuracy"] * 100,
            s=36,
            marker="x",
            color="tab:red",
            label=f"over budget as measured ({len(infeasible)})",
            zorder=3,
        )
        # The front is the accuracy/size one; on the params panel the same trials are
        # joined in order of params.
        ordered = front.sort_values(column)
        axis.step(
            ordered[column],
            ordered["accuracy"] * 100,
            where="post",
            color="tab:green",
            linewidth=1.5,
            zorder=2,
        )
        axis.scatter(
            ordered[column],
            ordered["accuracy"] * 100,
            s=90,
            facecolors="none",
            edgecolors="tab:green",
            linewidths=1.5,
            label=f"Pareto front ({len(front)})",
            zorder=4,
        )
        budget = getattr(budgets, budget_name)
        axis.axvline(budget, color="black", linestyle="--", linewidth=1, label="budget")
        axis.annotate(
            f"budget {amount(budget)}",
            xy=(budget, 0.98),
            xycoords=("data", "axes fraction"),
            rotation=90,
            ha="right",
            va="top",
            fontsize=9,
        )
        axis.set_xscale("log")
        if len(trained):
            axis.set_xlim(trained[column].min() / 1.5, max(budget, trained[column].max()) * 1.5)
            low = max(0.0, trained["accuracy"].min() * 100 - 2)
            axis.set_ylim(low, min(100.5, trained["accuracy"].max() * 100 + 1))
        axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(compact)
        axis.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
        axis.set_xlabel(label + " (log scale)")
        axis.set_ylabel("validation accuracy (%)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(loc="best", fontsize=9)
    counts = f"{len(trained)} trained trials, {rejected} over budget before training"
    figure.suptitle(f"{title}: {counts}" + (f", {stopped} stopped early" if stopped else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_html(frame: pd.DataFrame, budgets: Budgets, path: Path, title: str) -> Path:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    trained = frame[frame["trained"].astype(bool)].copy()
    params = [c for c in frame.columns if c.startswith("param_")]
    trained["hover"] = [
        f"trial {row['number']}<br>accuracy {row['accuracy']:.2%}<br>"
        f"size {row['size_kb']:.1f} KB<br>params {int(row['params']):,}<br>"
        + "<br>".join(f"{p.removeprefix('param_')}: {json.dumps(row[p])}" for p in params)
        for _, row in trained.iterrows()
    ]
    front = pareto_front(frame)
    figure = make_subplots(
        rows=1, cols=2, subplot_titles=("accuracy against size", "accuracy against params")
    )
    for col, (column, label, budget_name) in enumerate(AXES, start=1):
        for feasible, name, color, symbol in (
            (True, "feasible", "royalblue", "circle"),
            (False, "over budget as measured", "crimson", "x"),
        ):
            part = trained[trained["feasible"].astype(bool) == feasible]
            figure.add_trace(
                go.Scatter(
                    x=part[column],
                    y=part["accuracy"] * 100,
                    mode="markers",
                    name=name,
                    marker=dict(color=color, symbol=symbol, size=8),
                    hovertext=part["hover"],
                    hoverinfo="text",
                    legendgroup=name,
                    showlegend=col == 1,
                ),
                row=1,
                col=col,
            )
        ordered = front.sort_values(column)
        figure.add_trace(
            go.Scatter(
                x=ordered[column],
                y=ordered["accuracy"] * 100,
                mode="lines",
                line=dict(shape="hv", color="seagreen"),
                name="Pareto front",
                legendgroup="front",
                showlegend=col == 1,
                hoverinfo="skip",
            ),
            row=1,
            col=col,
        )
        budget = getattr(budgets, budget_name)
        low, high = (trained["accuracy"].min() * 100, 100) if len(trained) else (0, 100)
        figure.add_trace(
            go.Scatter(
                x=[budget, budget],
                y=[low, high],
                mode="lines",
                name="budget",
                line=dict(dash="dash", color="black", width=1),
                legendgroup="budget",
                showlegend=col == 1,
                hovertext=f"budget {amount(budget)}",
                hoverinfo="text",
            ),
            row=1,
            col=col,
        )
        figure.update_xaxes(title_text=label, type="log", row=1, col=col)
        figure.update_yaxes(title_text="validation accuracy (%)", row=1, col=col)
    figure.update_layout(title=title, height=520)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Self-contained: the page must open offline.
    figure.write_html(path, include_plotlyjs=True, full_html=True)
    return path
