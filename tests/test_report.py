"""The study's figures and report.html, on a study of known trials (no training)."""

from __future__ import annotations

import base64
import math
import random
import re

import optuna
import pytest

from compsearch.results.files import write_study_files
from compsearch.results.plots import (
    history_figure,
    importance_figure,
    pareto_figure,
    pareto_plotly,
    pyplot,
)
from compsearch.results.records import SETTINGS_KEY
from compsearch.results.report import trial_counts
from compsearch.results.table import (
    MIN_TRIALS_FOR_IMPORTANCE,
    accuracy_importance,
    hypervolume,
    pareto_front,
    search_history,
    trials_frame,
)
from compsearch.search.study import DIRECTIONS
from compsearch.spaces.budgets import Budgets

BUDGETS = Budgets(params=20_000, size_kb=50)
WIDTH = optuna.distributions.IntDistribution(4, 64)
DEPTH = optuna.distributions.IntDistribution(1, 3)


SETTINGS = {
    "dataset": "digits",
    "budgets": BUDGETS.to_dict(),
    "seed": 0,
    "subset": None,
    "data_source": ["digits", "/data"],
}


def known_study(trials: int = 24, seed: int = 0) -> optuna.Study:
    """Accuracy rises with width alone; size and params follow width. Every fourth config
    is rejected before training with the placeholder accuracy 0 and depth 3, so an
    importance that counted placeholders would credit depth. Trial 5 is over budget as
    measured, trial 6 failed."""
    study = optuna.create_study(directions=list(DIRECTIONS), study_name="known")
    study.set_user_attr(SETTINGS_KEY, SETTINGS)
    draw = random.Random(seed)
    for number in range(trials):
        width = draw.randint(4, 64)
        depth = draw.randint(1, 3)
        size_kb = width * 0.7
        attrs = {"params": width * 250, "size_kb": size_kb, "macs": width * 1000.0}
        state = optuna.trial.TrialState.COMPLETE
        values = [0.5 + width / 130, size_kb]
        if number % 4 == 3:
            depth = 3
            attrs = {"trained": False, "reason": "over budget before training: params"}
            values = [0.0, size_kb]
        elif number == 5:
            attrs |= {"trained": True, "size_kb": 80.0, "reason": "over budget as measured"}
            values = [0.99, 80.0]
        elif number == 6:
            attrs = {"trained": True, "reason": "TrainingDiverged: the loss is nan"}
            state, values = optuna.trial.TrialState.FAIL, None
        else:
            attrs |= {"trained": True, "accuracy_before_compression": values[0]}
        study.add_trial(
            optuna.trial.create_trial(
                params={"stage1_width": width, "stage1_depth": depth},
                distributions={"stage1_width": WIDTH, "stage1_depth": DEPTH},
                values=values,
                state=state,
                user_attrs=attrs,
            )
        )
    return study


# Trial number: (accuracy, size_kb, params, what else is true of it). Within BUDGETS
# (20,000 params, 50 KB) unless it says otherwise.
FRONT_TRIALS = {
    0: (0.70, 3.0, 2_000, "the smallest feasible file"),
    1: (0.80, 12.0, 8_000, "dominated by 2: less accurate and larger"),
    2: (0.90, 10.0, 7_000, ""),
    3: (0.85, 10.0, 7_000, "dominated by 2: as large, less accurate"),
    4: (0.95, 20.0, 14_000, "the most accurate feasible trial"),
    5: (0.95, 25.0, 17_000, "dominated by 4: as accurate, larger"),
    6: (0.99, 2.0, 30_000, "over the params budget as measured; would dominate all"),
    7: (0.0, 1.0, 500, "rejected before training: the placeholder accuracy 0"),
    8: (0.98, 60.0, 19_000, "over the KB budget as measured; the most accurate trained"),
    9: (math.nan, math.nan, 0, "failed"),
    10: (0.60, 4.0, 2_500, "dominated by 0: less accurate and larger"),
}
FRONT = [4, 2, 0]  # most accurate first


def front_study() -> optuna.Study:
    """The trials of FRONT_TRIALS, as the search records them."""
    study = optuna.create_study(directions=list(DIRECTIONS), study_name="front")
    study.set_user_attr(SETTINGS_KEY, SETTINGS)
    for number, (accuracy, size_kb, params, note) in FRONT_TRIALS.items():
        state = optuna.trial.TrialState.COMPLETE
        values = [accuracy, size_kb]
        attrs = {"trained": True, "params": params, "size_kb": size_kb, "macs": params * 10}
        attrs["accuracy_before_compression"] = accuracy
        if note.startswith("rejected"):
            attrs = {"trained": False, "reason": "over budget before training: params"}
        elif note.startswith("over"):
            attrs["reason"] = "over budget as measured"
        elif note == "failed":
            attrs = {"trained": True, "reason": "TrainingDiverged: the loss is nan"}
            state, values = optuna.trial.TrialState.FAIL, None
        study.add_trial(
            optuna.trial.create_trial(
                params={"stage1_width": 8 + number, "stage1_depth": 1},
                distributions={"stage1_width": WIDTH, "stage1_depth": DEPTH},
                values=values,
                state=state,
                user_attrs=attrs,
            )
        )
    return study


def test_the_front_keeps_exactly_the_feasible_trials_no_feasible_trial_beats():
    frame = trials_frame(front_study(), BUDGETS)
    assert sorted(frame.loc[frame["feasible"], "number"]) == [0, 1, 2, 3, 4, 5, 10]
    assert list(pareto_front(frame)["number"]) == FRONT


def test_the_report_and_the_figure_show_exactly_the_front(tmp_path):
    study = front_study()
    frame = trials_frame(study, BUDGETS)
    figure = pareto_figure(frame, BUDGETS, "front")
    size_axis, _ = figure.axes
    # The third set of points: the front's circles, at (size_kb, accuracy in %).
    circles = sorted(map(tuple, size_axis.collections[2].get_offsets().tolist()))
    expected = sorted((FRONT_TRIALS[n][1], FRONT_TRIALS[n][0] * 100) for n in FRONT)
    assert [size for size, _ in circles] == [size for size, _ in expected]
    assert [value for _, value in circles] == pytest.approx([value for _, value in expected])
    pyplot().close(figure)
    write_study_files(study, tmp_path)
    page = (tmp_path / "report.html").read_text()
    front_section = page.split("Feasible Pareto front")[1].split("<h2>")[0]
    shown = re.findall(r'<tr><td class="number">(\d+)</td>', front_section)
    assert [int(number) for number in shown] == FRONT


@pytest.fixture(scope="module")
def study() -> optuna.Study:
    return known_study()


@pytest.fixture(scope="module")
def frame(study):
    return trials_frame(study, BUDGETS)


def test_hypervolume_of_known_fronts():
    assert hypervolume([], 100) == 0
    assert hypervolume([(0, 0.5)], 100) == pytest.approx(0.5)
    assert hypervolume([(50, 1.0)], 100) == pytest.approx(0.5)
    assert hypervolume([(0, 0.5), (50, 1.0)], 100) == pytest.approx(0.75)
    # A dominated point and one over the KB budget add nothing.
    assert hypervolume([(0, 0.5), (50, 1.0), (60, 0.4), (150, 1.0)], 100) == pytest.approx(0.75)


def test_history_never_falls_and_ends_at_the_whole_front(frame):
    history = search_history(frame, BUDGETS)
    assert list(history["number"]) == sorted(frame["number"])
    assert history["hypervolume"].is_monotonic_increasing
    best = history["best_accuracy"].dropna()
    assert best.is_monotonic_increasing
    feasible = frame[frame["feasible"]]
    assert best.iloc[-1] == feasible["accuracy"].max()
    points = list(zip(feasible["size_kb"], feasible["accuracy"], strict=True))
    assert history["hypervolume"].iloc[-1] == pytest.approx(hypervolume(points, 50))


def test_importance_credits_the_parameter_that_drives_accuracy(study):
    importance = accuracy_importance(study)
    assert set(importance.index) == {"stage1_width", "stage1_depth"}
    assert importance.sum() == pytest.approx(1)
    # Counting the rejected trials' placeholder 0 would make depth matter.
    assert importance["stage1_width"] > 0.8 > importance["stage1_depth"]


def test_importance_is_empty_with_too_few_trained_trials():
    assert accuracy_importance(known_study(trials=MIN_TRIALS_FOR_IMPORTANCE)).empty


def scatter_points(axis) -> list[int]:
    return [len(collection.get_offsets()) for collection in axis.collections]


def test_pareto_figure_has_labelled_axes_budgets_and_every_point(frame):
    figure = pareto_figure(frame, BUDGETS, "known")
    trained = frame[frame["trained"]]
    feasible = int(trained["feasible"].sum())
    front = pareto_front(frame)
    size_axis, params_axis = figure.axes
    assert size_axis.get_xlabel().startswith("ONNX file size (KB)")
    assert params_axis.get_xlabel().startswith("parameters")
    for axis, budget in ((size_axis, BUDGETS.size_kb), (params_axis, BUDGETS.params)):
        assert axis.get_ylabel() == "validation accuracy (%)"
        # feasible, over budget as measured, the front's circles
        assert scatter_points(axis) == [feasible, len(trained) - feasible, len(front)]
        budget_lines = [line for line in axis.lines if line.get_linestyle() == "--"]
        assert [list(line.get_xdata()) for line in budget_lines] == [[budget, budget]]
        labels = [text.get_text() for text in axis.get_legend().get_texts()]
        assert f"Pareto front ({len(front)})" in labels
    pyplot().close(figure)


def test_pareto_html_hover_names_each_trial_and_its_config(frame, tmp_path):
    figure = pareto_plotly(frame, BUDGETS, "known")
    feasible = frame[frame["feasible"] & frame["top_fidelity"]]
    traces = [trace for trace in figure.data if trace.name == "feasible"]
    assert len(traces) == 2  # one per panel
    hovers = list(traces[0].hovertext)
    assert len(hovers) == len(feasible)
    for hover, (_, row) in zip(hovers, feasible.iterrows(), strict=True):
        assert hover.startswith(f"trial {row['number']} (rung {row['rung']})<br>")
        assert f"stage1_width: {row['param_stage1_width']}" in hover
    axes = {figure.layout.xaxis.title.text, figure.layout.xaxis2.title.text}
    assert axes == {"ONNX file size (KB)", "parameters"}


def test_history_and_importance_figures_are_labelled(study, frame):
    history = search_history(frame, BUDGETS)
    figure = history_figure(history, frame, "known")
    accuracy_axis, volume_axis = figure.axes
    assert accuracy_axis.get_xlabel() == volume_axis.get_xlabel() == "trial number"
    assert accuracy_axis.get_ylabel() == "validation accuracy (%)"
    assert "budget KB" in volume_axis.get_ylabel()
    assert len(volume_axis.lines[0].get_xdata()) == len(frame)
    pyplot().close(figure)
    importance = accuracy_importance(study)
    figure = importance_figure(importance, int(frame["trained"].sum()), "known")
    (axis,) = figure.axes
    labels = [tick.get_text() for tick in axis.get_yticklabels()]
    assert labels == list(importance.index)  # most important on top
    assert "fANOVA" in axis.get_xlabel()
    pyplot().close(figure)


def test_report_is_one_self_contained_page(study, frame, tmp_path):
    written = write_study_files(study, tmp_path)
    names = {path.name for path in written}
    assert names == {
        "trials.csv",
        "pareto.png",
        "pareto.html",
        "history.png",
        "importance.png",
        "report.html",
    }
    page = (tmp_path / "report.html").read_text()
    # Every figure is inside the page as PNG data, and nothing else is linked.
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "20,000" in page and "<td>file size (KB)</td>" in page
    counts = trial_counts(frame)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total") == len(frame)
    assert counts["failed"] == 1 and counts["finished, over budget as measured"] == 1
    for outcome, count in counts.items():
        assert f'<td>{outcome}</td><td class="number">{count}</td>' in page
    front = pareto_front(frame)
    front_section = page.split("Feasible Pareto front")[1].split("<h2>")[0]
    assert front_section.count("<tr>") == len(front) + 1  # the header
    assert f"{front['accuracy'].iloc[0]:.2%}" in front_section
    assert "Not exported yet" in page
