"""The checks a job makes before torch is imported: the search space, the study's stored
settings, the budgets against the space, and the dataset's files. Bad input stops here,
in a fraction of a second, with nothing written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from rich.console import Console

from compsearch.objectives.catalog import CACHE_FOLDER, FOLDER_PREFIX
from compsearch.objectives.data import Dataset, load_dataset
from compsearch.results.export import choose_trial
from compsearch.results.records import StudySettings, TrialRecord, read_trials, study_settings
from compsearch.search.common import SPACE_FILE, UsageError
from compsearch.search.options import ExportOptions, RunOptions, check_format
from compsearch.search.study import (
    check_same_budgets,
    check_same_format,
    check_same_objectives,
    locate_study,
    stored_settings,
)
from compsearch.spaces.budgets import Budgets, amount
from compsearch.spaces.estimate import extreme_estimate
from compsearch.spaces.space import SearchSpace


@dataclass(frozen=True)
class PreparedRun:
    options: RunOptions
    data: Dataset
    space: SearchSpace  # the space searched: the stored one when the study goes on
    stored: StudySettings | None  # None for a new study


def prepare_run(options: RunOptions, space: SearchSpace | None, console: Console) -> PreparedRun:
    """`space`: the space asked for, when the dataset's shape is known without loading it
    (see `RunOptions.known_space`); None for folder datasets."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name, folder = options.study_name, options.folder
    stored = stored_settings(options.storage_url, name)
    if stored is not None:
        # First: another format narrows the space otherwise (int8 under tflite).
        check_same_format(name, stored, options.format)
    if stored is not None and stored.space is not None:
        # A study goes on in the space it was created with.
        if options.space and space is not None and space != stored.space:
            raise UsageError(
                f"study {name!r} was created with another search space (see "
                f"{folder / SPACE_FILE}); pass that file to --space, leave --space out, or "
                "start a new --study"
            )
        space = stored.space
    if stored is not None:
        # The same check open_study makes, made before the data is read.
        check_same_budgets(name, stored, options.budgets)
        check_same_objectives(name, stored, options.objectives)
    if space is not None:
        check_reachable(space, options.budgets, console.print, options.format)
    data = load_dataset(
        options.dataset, seed=options.seed, subset=options.subset, data_dir=options.data_dir,
        console=console, cache_folder=options.out / CACHE_FOLDER,
    )  # fmt: skip
    if space is None:  # a dataset whose shape is known only once loaded
        space = options.space_for(data.channels, data.num_classes, data.resolution)
        check_reachable(space, options.budgets, console.print, options.format)
    return PreparedRun(options, data, space, stored)


def check_reachable(
    space: SearchSpace, budgets: Budgets, say: Callable[[str], None], file_format: str = "onnx"
) -> None:
    """Exit before any work when nothing in the space can meet the budgets, and say so
    when a budget is above everything the space holds (it then constrains nothing)."""
    smallest = extreme_estimate(space, smallest=True, file_format=file_format)
    over = budgets.excess(smallest.params, smallest.size_kb, smallest.macs, smallest.ram_kb)
    if over:
        raise UsageError(
            "no model in the search space meets the budgets: the smallest reachable has "
            f"{smallest.params:,} params, {smallest.size_kb:.1f} KB, {smallest.macs:,} MACs, "
            f"at least {smallest.ram_kb:.1f} KB of RAM ({'; '.join(over)}); raise the "
            "budgets, or widen the space to smaller models with --space (lower width, "
            "stem_width and depth, higher prune_fraction, int8 in precisions)"
        )
    largest = extreme_estimate(space, smallest=False, file_format=file_format)
    slack = [
        f"--{flag} {amount(limit)} is above the largest model the space holds "
        f"({amount(reached)}{unit})"
        for flag, limit, reached, unit in (
            ("budget-params", budgets.params, largest.params, " params"),
            ("budget-kb", budgets.size_kb, largest.size_kb, " KB"),
            ("budget-macs", budgets.macs, largest.macs, " MACs"),
            ("budget-ram", budgets.ram_kb, largest.ram_kb, " KB of RAM at most"),
        )
        if limit is not None and limit >= reached
    ]
    if slack:
        say("note: " + "; ".join(slack) + ": it does not constrain this search")


@dataclass(frozen=True)
class PreparedExport:
    options: ExportOptions
    study: optuna.Study
    folder: Path  # the study's folder
    settings: StudySettings
    record: TrialRecord  # the trial to export
    dataset: str  # where its data is now: the name, and the folder of its files
    data_dir: Path
    file_format: str = "onnx"  # --format, or the study's run --format when not given


def prepare_export(options: ExportOptions, console: Console) -> PreparedExport:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, folder = locate_study(options.location, console.print)
    settings = study_settings(study)
    records = read_trials(study.get_trials(deepcopy=False))
    record = choose_trial(study.study_name, records, settings.budgets, options.trial)
    file_format = options.format or settings.file_format
    if options.format is None:
        check_format(file_format)  # the study's: its extra may be missing here
    name, stored_dir = settings.data_source
    if options.data_dir and name.startswith(FOLDER_PREFIX):
        name = f"{FOLDER_PREFIX}{options.data_dir}"
    return PreparedExport(
        options, study, folder, settings, record, name, options.data_dir or Path(stored_dir),
        file_format,
    )  # fmt: skip
