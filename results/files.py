"""What `run`, `plot` and `export` leave beside a study: trials.csv, the figures and
report.html, all from the study's records."""

from __future__ import annotations

from pathlib import Path

import optuna

from compsearch.results.plots import write_history_png, write_html, write_importance_png, write_png
from compsearch.results.records import study_settings
from compsearch.results.report import write_report
from compsearch.results.table import accuracy_importance, search_history, trials_frame


def study_title(study: optuna.Study) -> str:
    """ "digits (<= 50,000 params, <= 50 KB)": how tables and figures name a study."""
    return f"{study.study_name} ({study_settings(study).budgets.describe()})"


def write_study_files(study: optuna.Study, folder: Path) -> list[Path]:
    """trials.csv, pareto.png, pareto.html, history.png, importance.png (once enough
    trials are trained) and report.html in `folder`; the paths written, report last."""
    settings = study_settings(study)
    budgets = settings.budgets
    frame = trials_frame(study, budgets)
    folder.mkdir(parents=True, exist_ok=True)
    csv = folder / "trials.csv"
    frame.to_csv(csv, index=False)
    title = study_title(study)
    written = [
        csv,
        write_png(frame, budgets, folder / "pareto.png", title),
        write_html(frame, budgets, folder / "pareto.html", title),
        write_history_png(search_history(frame, budgets), frame, folder / "history.png", title),
    ]
    importance = write_importance_png(
        accuracy_importance(study), int(frame["trained"].sum()), folder / "importance.png", title
    )
    if importance is not None:
        written.append(importance)
    written.append(write_report(frame, settings, folder, study.study_name))
    return written
