"""The study's figures.

pareto.png (matplotlib) and pareto.html (plotly): accuracy against size and params.
history.png: the best feasible accuracy and the hypervolume after each trial.
importance.png: which searched parameters mattered most for accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from compsearch.results.table import compact_amount, outcome_counts, pareto_front
from compsearch.spaces.budgets import Budgets, amount

AXES = (("size_kb", "ONNX file size (KB)", "size_kb"), ("params", "parameters", "params"))
LATENCY_AXIS = ("latency_ms", "median latency, one thread (ms)", "latency_ms")


def axes_of(front: pd.DataFrame) -> tuple[tuple[str, str, str], ...]:
    """The panels: accuracy against size and params, and against latency when it is an
    objective. With three objectives the front is not a line on any one panel: its trials
    are drawn, not joined."""
    return AXES + ((LATENCY_AXIS,) if "latency_ms" in front.attrs.get("objectives", ()) else ())


def pyplot():
    """matplotlib's pyplot on the file-only backend: plots are written, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def write_png(frame: pd.DataFrame, budgets: Budgets, path: Path, title: str) -> Path:
    return save_png(pareto_figure(frame, budgets, title), path)


def pareto_figure(frame: pd.DataFrame, budgets: Budgets, title: str):
    """Two panels, accuracy against size_kb and against params, both log-scaled."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    plt = pyplot()

    trained = frame[frame["trained"].astype(bool)]
    feasible = trained[trained["feasible"].astype(bool)]
    # Like with like: the front and the blue points are the trials of the highest
    # fidelity reached; those of lower rungs, trained less, are grey.
    lower = feasible[~feasible["top_fidelity"].astype(bool)]
    feasible = feasible[feasible["top_fidelity"].astype(bool)]
    infeasible = trained[~trained["feasible"].astype(bool)]
    front = pareto_front(frame)
    panels = axes_of(front)
    joined = len(panels) == len(AXES)
    rejected, stopped, _ = outcome_counts(frame)
    figure, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 5), constrained_layout=True
    )
    compact = FuncFormatter(lambda value, _: compact_amount(value))
    for axis, (column, label, budget_name) in zip(axes, panels, strict=True):
        axis.scatter(
            feasible[column],
            feasible["accuracy"] * 100,
            s=28,
            color="tab:blue",
            label=f"feasible ({len(feasible)})" + (", highest rung" if len(lower) else ""),
            zorder=3,
        )
        if len(lower):
            axis.scatter(
                lower[column],
                lower["accuracy"] * 100,
                s=18,
                color="tab:gray",
                alpha=0.6,
                label=f"feasible, lower rungs ({len(lower)})",
                zorder=2,
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
        if joined:
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
        if budget is not None:
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
            high = max(budget or 0, trained[column].max())
            axis.set_xlim(trained[column].min() / 1.5, high * 1.5)
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
    return figure


def write_html(frame: pd.DataFrame, budgets: Budgets, path: Path, title: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Self-contained: the page must open offline.
    pareto_plotly(frame, budgets, title).write_html(path, include_plotlyjs=True, full_html=True)
    return path


def pareto_plotly(frame: pd.DataFrame, budgets: Budgets, title: str):
    """The interactive pareto figure; hovering a point shows its trial number and config."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    trained = frame[frame["trained"].astype(bool)].copy()
    params = [c for c in frame.columns if c.startswith("param_")]
    trained["hover"] = [
        f"trial {row['number']} (rung {row['rung']})<br>accuracy {row['accuracy']:.2%}<br>"
        f"size {row['size_kb']:.1f} KB<br>params {int(row['params']):,}<br>"
        f"latency {row['latency_ms']:.3g} ms<br>"
        + "<br>".join(f"{p.removeprefix('param_')}: {json.dumps(row[p])}" for p in params)
        for _, row in trained.iterrows()
    ]
    front = pareto_front(frame)
    panels = axes_of(front)
    joined = len(panels) == len(AXES)
    titles = ("accuracy against size", "accuracy against params", "accuracy against latency")
    figure = make_subplots(rows=1, cols=len(panels), subplot_titles=titles[: len(panels)])
    for col, (column, label, budget_name) in enumerate(panels, start=1):
        feasible = trained["feasible"].astype(bool)
        top = trained["top_fidelity"].astype(bool)
        for part, name, color, symbol in (
            (trained[top], "feasible", "royalblue", "circle"),
            (trained[feasible & ~top], "feasible, lower rungs", "darkgray", "circle"),
            (trained[~feasible], "over budget as measured", "crimson", "x"),
        ):
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
                mode="lines" if joined else "markers",
                line=dict(shape="hv", color="seagreen"),
                marker=dict(size=14, color="rgba(0,0,0,0)", line=dict(color="seagreen", width=2)),
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
        if budget is None:
            figure.update_xaxes(title_text=label, type="log", row=1, col=col)
            figure.update_yaxes(title_text="validation accuracy (%)", row=1, col=col)
            continue
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
    return figure


def write_history_png(history: pd.DataFrame, frame: pd.DataFrame, path: Path, title: str) -> Path:
    return save_png(history_figure(history, frame, title), path)


def history_figure(history: pd.DataFrame, frame: pd.DataFrame, title: str):
    """Left: every trained trial's accuracy and the best feasible one so far. Right: the
    hypervolume of the feasible trials so far, the search's progress in one number."""
    plt = pyplot()
    from matplotlib import ticker

    trained = frame[frame["trained"].astype(bool)]
    feasible = trained[trained["feasible"].astype(bool)]
    infeasible = trained[~trained["feasible"].astype(bool)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    left.scatter(
        feasible["number"],
        feasible["accuracy"] * 100,
        s=18,
        color="tab:blue",
        alpha=0.6,
        label="feasible trial",
    )
    left.scatter(
        infeasible["number"],
        infeasible["accuracy"] * 100,
        s=24,
        marker="x",
        color="tab:red",
        label="over budget as measured",
    )
    left.step(
        history["number"],
        history["best_accuracy"] * 100,
        where="post",
        color="tab:green",
        linewidth=2,
        label="best feasible so far",
    )
    if len(trained):
        left.set_ylim(max(0.0, trained["accuracy"].min() * 100 - 2), 100.5)
    left.set_xlabel("trial number")
    left.set_ylabel("validation accuracy (%)")
    left.set_title("accuracy of each trial, best feasible so far")
    left.grid(True, alpha=0.3)
    left.legend(loc="best", fontsize=9)  # clear of the points, high or low
    right.step(
        history["number"], history["hypervolume"], where="post", color="tab:purple", linewidth=2
    )
    right.set_ylim(0, max(0.05, history["hypervolume"].max() * 1.1) if len(history) else 1)
    right.set_xlabel("trial number")
    right.set_ylabel("dominated share of [0, budget KB] x [0, 100%]")
    right.set_title("hypervolume of the feasible front (accuracy, size)")
    right.grid(True, alpha=0.3)
    for axis in (left, right):
        axis.set_xlim(-0.5, max(1, len(history)) - 0.5)
        axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # trial numbers
    figure.suptitle(title)
    return figure


IMPORTANCE_SHOWN = 15  # bars drawn; the rest are summed into one


def write_importance_png(
    importance: pd.Series, trained: int, path: Path, title: str
) -> Path | None:
    """Horizontal bars, most important on top. None (and no file) when there are too few
    trained trials to say."""
    if importance.empty:
        path.unlink(missing_ok=True)
        return None
    return save_png(importance_figure(importance, trained, title), path)


def importance_figure(importance: pd.Series, trained: int, title: str):
    plt = pyplot()
    shown = importance.head(IMPORTANCE_SHOWN)
    rest = importance.iloc[IMPORTANCE_SHOWN:].sum()
    labels = list(shown.index)
    values = list(shown.values)
    if len(importance) > IMPORTANCE_SHOWN:
        labels.append(f"{len(importance) - IMPORTANCE_SHOWN} others together")
        values.append(rest)
    figure, axis = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.6), constrained_layout=True)
    bars = axis.barh(range(len(labels)), [v * 100 for v in values], color="tab:blue")
    axis.set_yticks(range(len(labels)), labels)
    axis.invert_yaxis()
    for bar, value in zip(bars, values, strict=True):
        axis.annotate(
            f"{value:.0%}",
            xy=(bar.get_width(), bar.get_y() + bar.get_height() / 2),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    axis.set_xlim(0, max(values) * 100 * 1.15)
    axis.set_xlabel("share of accuracy variance explained (%, fANOVA)")
    axis.set_title(
        f"{title}\nwhich searched parameters mattered for accuracy ({trained} trained trials)"
    )
    axis.grid(True, axis="x", alpha=0.3)
    return figure
