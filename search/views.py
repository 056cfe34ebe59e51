"""A study as its records stand, for `show` and for what `run` returns; no torch."""

from __future__ import annotations

from pathlib import Path

import optuna

from compsearch.results.records import read_trials, study_settings
from compsearch.results.table import pareto_front, trials_frame
from compsearch.search.summaries import StudyView


def view_of(study: optuna.Study, folder: Path) -> StudyView:
    settings = study_settings(study)
    records = tuple(read_trials(study.get_trials(deepcopy=False)))
    frame = trials_frame(study, settings.budgets)
    by_number = {record.number: record for record in records}
    front = tuple(by_number[int(number)] for number in pareto_front(frame)["number"])
    return StudyView(study.study_name, settings.budgets, folder, records, front, frame)
