"""What a study records in Optuna, as typed objects: the settings it was created with and
each trial's record. This module is the one place that writes them (study and trial
user attributes) and the one place that reads them back; everything else uses
`StudySettings` and `TrialRecord`.

It imports neither optuna nor torch: Optuna's studies, trials and storages are used
through the few methods named here.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compsearch.spaces.budgets import Budgets
from compsearch.spaces.config import TrialConfig
from compsearch.spaces.space import SearchSpace

if TYPE_CHECKING:
    import optuna

    from compsearch.objectives.trial import TrialResult
    from compsearch.spaces.estimate import Estimate

SETTINGS_KEY = "compsearch"  # the study user attribute holding its StudySettings

# What a study can optimize, by --objectives name: the trials.csv column and its direction.
OBJECTIVES = {
    "accuracy": ("accuracy", "maximize"),
    "size": ("size_kb", "minimize"),
    "latency": ("latency_ms", "minimize"),
}
DEFAULT_OBJECTIVES = ("accuracy", "size")
CHOICES_OF_OBJECTIVES = (DEFAULT_OBJECTIVES, ("accuracy", "size", "latency"))


def objective_columns(objectives: Iterable[str]) -> tuple[str, ...]:
    """The trials.csv columns of `objectives` (names of OBJECTIVES), in order."""
    return tuple(OBJECTIVES[name][0] for name in objectives)


def study_objective_columns(study: optuna.Study) -> tuple[str, ...]:
    """The columns of what `study` optimizes, read off its directions: accuracy and
    size_kb, and latency_ms as a third (--objectives accuracy,size,latency)."""
    return objective_columns(tuple(OBJECTIVES)[: len(study.directions)])


# The reason of a trial that another worker failed: its own worker can no longer write it.
LOST = "worker lost (no heartbeat): killed, out of memory or its machine gone"
INTERRUPTED = "interrupted before it finished (Ctrl-C)"
# The reason of a trial asked for when other workers had just taken the last ones.
SURPLUS = "not run: other workers had already taken the run's last trials"
NAN = math.nan


class NotCompsearchStudy(ValueError):
    """A study that compsearch did not create (it holds no StudySettings)."""


@dataclass(frozen=True)
class StudySettings:
    """What must stay the same for a study's whole life, and what `export` and the report
    need to know of how it ran."""

    dataset: str  # the dataset's name as loaded ("digits", "folder:/abs/path")
    budgets: Budgets
    seed: int = 0
    subset: int | None = None  # training images per trial; None: all
    teacher: str = "none"
    # The dataset as given (folder: paths absolute) and the folder its files were read
    # from, so that `export` finds the same data from anywhere.
    data_source: tuple[str, str] = ("", "data")
    space: SearchSpace | None = None  # None only in studies older than the space's record
    version: str = ""
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES  # names of OBJECTIVES, in Optuna's order
    file_format: str = "onnx"  # what each trial's file is (run --format)

    def to_attrs(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "budgets": self.budgets.to_dict(),
            "seed": self.seed,
            "subset": self.subset,
            "teacher": self.teacher,
            "data_source": list(self.data_source),
            "space": self.space.to_dict() if self.space is not None else None,
            "version": self.version,
            "objectives": list(self.objectives),
            "format": self.file_format,
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StudySettings:
        source = attrs.get("data_source") or [attrs["dataset"], "data"]
        space = attrs.get("space")
        return cls(
            dataset=attrs["dataset"],
            budgets=Budgets(**attrs["budgets"]),
            seed=int(attrs.get("seed") or 0),
            subset=attrs.get("subset"),
            teacher=attrs.get("teacher") or "none",
            data_source=(str(source[0]), str(source[1])),
            space=SearchSpace.from_dict(space) if space else None,
            version=attrs.get("version", ""),
            objectives=tuple(attrs.get("objectives") or DEFAULT_OBJECTIVES),
            file_format=attrs.get("format") or "onnx",
        )


def write_settings(study: optuna.Study, settings: StudySettings) -> None:
    study.set_user_attr(SETTINGS_KEY, settings.to_attrs())


def read_settings(study_attrs: Mapping[str, Any]) -> StudySettings | None:
    """The settings in a study's user attributes; None when compsearch did not make it."""
    attrs = study_attrs.get(SETTINGS_KEY)
    return StudySettings.from_attrs(attrs) if attrs is not None else None


def study_settings(study: optuna.Study) -> StudySettings:
    settings = read_settings(study.user_attrs)
    if settings is None:
        raise NotCompsearchStudy(f"study {study.study_name!r} was not created by compsearch")
    return settings


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the study holds it. Measured figures are NaN for a trial that was not
    trained to the end; estimates are NaN before its config was sampled."""

    number: int
    state: str  # Optuna's state name: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    trained: bool  # trained to the end and measured
    accuracy: float  # validation top-1 of the ONNX file in onnxruntime
    accuracy_before_compression: float  # of the torch fp32 model
    accuracy_post_training: float  # of the file as first exported
    quantization_aware: bool | None  # the file is from a quantization-aware fine-tune
    params: float
    size_kb: float
    macs: float
    ram_kb: float  # peak activation memory of one inference of the file / 1000
    latency_ms: float  # median single-image latency of the file, one thread, this machine
    seconds: float  # the whole trial
    # Of `seconds`, those of training alone (NaN: a study from before they were recorded).
    train_seconds: float
    reason: str  # why it was not trained, failed or broke a budget; "" when none did
    estimated_params: float
    estimated_size_kb: float
    estimated_macs: float
    estimated_ram_kb: float
    # The latency model's prediction (NaN: no --budget-latency, so none was made).
    estimated_latency_ms: float
    early_accuracy: float  # validation accuracy at the early check; NaN: no check made
    fitted_from: int | None  # the rejected trial this one is a shrunk copy of
    retry_of: int | None  # the failed trial this one runs again
    worker: str  # host:pid of the process that ran it
    anchor: str  # the known architecture it is ("resnet8", ...), "" for a sampled config
    # Its fidelity (search/fidelity.py): rung `rung` (from 0) of a ladder of `rungs`, on
    # `train_images` training images (None: a study from before fidelities, one for all).
    rung: int
    rungs: int
    train_images: int | None
    # The rung's predicted training seconds, for a run whose rungs count seconds (None:
    # they count epochs x images, or a study from before fidelities).
    fidelity_seconds: float | None
    promoted_from: int | None  # the trial at the rung below whose config this one is
    # The cost model's seconds for the config, before it trained (NaN: none predicted).
    predicted_seconds: float
    # Its work (spaces/cost.py Work's fields), from which the cost model is refitted.
    work: tuple[float, ...] | None
    # Wall-clock time (seconds since the epoch) after which no trial of its run was to end
    # by prediction; None: the run had no --time.
    deadline: float | None
    onnx_path: str  # the deployed file, relative to the study's folder
    config: TrialConfig | None  # as deployed (widths after pruning)
    searched: dict[str, Any] = field(default_factory=dict)  # the sampled parameters
    # Under `run --format tflite`: the .tflite file its figures measure (relative to the
    # study's folder) and the validation top-1 of the ONNX int8 file beside it.
    tflite_path: str = ""
    onnx_accuracy: float = NAN
    tflite_seconds: float = NAN  # of `seconds`, those writing and measuring the .tflite file

    def feasible(self, budgets: Budgets) -> bool:
        return self.trained and not budgets.excess(
            self.params, self.size_kb, self.macs, self.ram_kb, self.latency_ms
        )

    @property
    def fidelity(self) -> tuple[int, float, int]:
        """Trials with equal figures trained alike, and the larger trained more: for rungs
        counted in seconds (1, rungs below the top as a negative number, 0), every config
        of one rung alike whatever its epochs; else (0, training images x epochs, rung);
        (0, 0, 0) for a trial from before fidelities or untrained."""
        if self.config is None or self.train_images is None:
            return (0, 0, 0)
        if self.fidelity_seconds is not None:
            return (1, self.rung - (self.rungs - 1), 0)
        return (0, self.train_images * self.config.train.epochs, self.rung)


def read_trial(trial: optuna.trial.FrozenTrial, run_again_as: int | None = None) -> TrialRecord:
    attrs = trial.user_attrs
    state = trial.state.name
    trained = bool(attrs.get("trained", False)) and state == "COMPLETE"
    reason = attrs.get("reason", "")
    if state == "FAIL" and not reason:
        reason = LOST
    if run_again_as is not None:
        reason += f"; run again as trial {run_again_as}"

    def measured(name: str) -> float:
        return attrs.get(name, NAN) if trained else NAN

    config = attrs.get("config")
    quantization_aware = attrs.get("quantization_aware")
    return TrialRecord(
        number=trial.number,
        state=state,
        trained=trained,
        accuracy=trial.values[0] if trained and trial.values else NAN,
        accuracy_before_compression=measured("accuracy_before_compression"),
        accuracy_post_training=measured("accuracy_post_training"),
        quantization_aware=bool(quantization_aware) if quantization_aware is not None else None,
        params=measured("params"),
        size_kb=measured("size_kb"),
        macs=measured("macs"),
        ram_kb=measured("ram_kb"),
        latency_ms=measured("latency_ms"),
        seconds=attrs.get("seconds", NAN),
        train_seconds=attrs.get("train_seconds", NAN),
        reason=reason,
        estimated_params=attrs.get("estimated_params", NAN),
        estimated_size_kb=attrs.get("estimated_size_kb", NAN),
        estimated_macs=attrs.get("estimated_macs", NAN),
        estimated_ram_kb=attrs.get("estimated_ram_kb", NAN),
        estimated_latency_ms=attrs.get("estimated_latency_ms", NAN),
        early_accuracy=none_as_nan(attrs.get("early_accuracy", NAN)),
        fitted_from=attrs.get("fitted_from"),
        retry_of=attrs.get("retry_of"),
        worker=attrs.get("worker", ""),
        anchor=attrs.get("anchor", ""),
        rung=attrs.get("rung", 0),
        rungs=attrs.get("rungs", 1),
        train_images=attrs.get("train_images"),
        fidelity_seconds=attrs.get("fidelity_seconds"),
        promoted_from=attrs.get("promoted_from"),
        predicted_seconds=attrs.get("predicted_seconds", NAN),
        work=tuple(attrs["work"]) if "work" in attrs else None,
        deadline=attrs.get("deadline"),
        onnx_path=attrs.get("onnx_path", ""),
        config=TrialConfig.from_dict(config) if config else None,
        searched=dict(trial.params),
        tflite_path=attrs.get("tflite_path", ""),
        onnx_accuracy=measured("onnx_accuracy"),
        tflite_seconds=measured("tflite_seconds"),
    )


def read_trials(trials: Iterable[optuna.trial.FrozenTrial]) -> list[TrialRecord]:
    """Every trial's record; a failed trial's reason says which trial runs it again."""
    trials = list(trials)
    run_again_as = {
        t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs
    }
    return [read_trial(trial, run_again_as.get(trial.number)) for trial in trials]


def at_top_fidelity(records: Iterable[TrialRecord], budgets: Budgets) -> list[TrialRecord]:
    """The feasible trials at the highest fidelity any feasible trial reached: the ones
    that compare like with like at the end of a multi-fidelity search."""
    feasible = [record for record in records if record.feasible(budgets)]
    top = max((record.fidelity for record in feasible), default=None)
    return [record for record in feasible if record.fidelity == top]


def best_feasible(records: Iterable[TrialRecord], budgets: Budgets) -> TrialRecord | None:
    """The most accurate feasible trial at the highest fidelity reached (the smaller file
    on a tie), if any."""
    return max(
        at_top_fidelity(records, budgets),
        key=lambda r: (r.accuracy, -r.size_kb, -r.number),
        default=None,
    )


@dataclass(frozen=True)
class PredictionErrors:
    """How far the cost model's predictions were from the measured seconds, over the
    trials trained to the end, as relative errors (predicted - measured) / measured:
    negative where a trial took longer than predicted."""

    trials: int
    median: float  # of the absolute relative errors
    worst: float  # the largest absolute relative error, with its sign
    worst_trial: int

    @classmethod
    def of(cls, records: Iterable[TrialRecord]) -> PredictionErrors | None:
        return cls.of_pairs(
            (r.number, r.predicted_seconds, r.seconds) for r in records if r.trained
        )

    @classmethod
    def of_pairs(cls, trials: Iterable[tuple[int, float, float]]) -> PredictionErrors | None:
        """From (trial number, predicted seconds, measured seconds) of trained trials;
        None when none has both."""
        pairs = [
            (number, (predicted - seconds) / seconds)
            for number, predicted, seconds in trials
            if seconds > 0 and not math.isnan(predicted)
        ]
        if not pairs:
            return None
        number, worst = max(pairs, key=lambda pair: abs(pair[1]))
        median = statistics.median(abs(error) for _, error in pairs)
        return cls(len(pairs), median, worst, number)

    def describe(self) -> str:
        return (
            f"cost model: predicted seconds off by {self.median:.0%} (median) and at worst "
            f"{self.worst:+.0%} (trial {self.worst_trial}; negative: slower than predicted) "
            f"over {self.trials} trained trials"
        )


def none_as_nan(value: float | None) -> float:
    return NAN if value is None else value


# Writers. A trial's record is written as the trial goes: who runs it, its estimate, then
# one outcome.


def write_worker(trial: optuna.Trial, worker: str) -> None:
    trial.set_user_attr("worker", worker)


def write_estimate(trial: optuna.Trial, expected: Estimate) -> None:
    trial.set_user_attr("estimated_params", expected.params)
    trial.set_user_attr("estimated_size_kb", expected.size_kb)
    trial.set_user_attr("estimated_macs", expected.macs)
    trial.set_user_attr("estimated_ram_kb", expected.ram_kb)


def write_rejected(trial: optuna.Trial, over: list[str]) -> None:
    trial.set_user_attr("trained", False)
    trial.set_user_attr("reason", "over budget before training: " + ", ".join(over))


def write_prediction(
    trial: optuna.Trial, seconds: float, work: tuple[float, ...], deadline: float | None
) -> None:
    """What the cost model predicted for the config before it could start."""
    trial.set_user_attr("predicted_seconds", round(seconds, 3))
    trial.set_user_attr("work", list(work))
    if deadline is not None:
        trial.set_user_attr("deadline", deadline)


def write_fidelity(
    trial: optuna.Trial, rung: int, rungs: int, train_images: int, seconds: float | None = None
) -> None:
    """The trial's rung of the run's fidelity ladder, its training images (its epochs are
    in its config) and, for a rung counted in seconds, the rung's seconds."""
    trial.set_user_attr("rung", rung)
    trial.set_user_attr("rungs", rungs)
    trial.set_user_attr("train_images", train_images)
    if seconds is not None:
        trial.set_user_attr("fidelity_seconds", round(seconds, 3))


def write_too_slow(trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr("trained", False)
    trial.set_user_attr("reason", "too slow for the time left: " + reason)


def write_stopped_early(trial: optuna.Trial, early_accuracy: float, reason: str) -> None:
    trial.set_user_attr("trained", False)
    trial.set_user_attr("early_accuracy", early_accuracy)
    trial.set_user_attr("reason", f"stopped early: {reason}")


def write_failed(trial: optuna.Trial, reason: str, trained: bool | None = None) -> None:
    """A trial that failed; `trained` True when training itself failed (diverged, out of
    memory), None when the failure says nothing of it."""
    if trained is not None:
        trial.set_user_attr("trained", trained)
    trial.set_user_attr("reason", reason)


def write_result(trial: optuna.Trial, result: TrialResult, folder: Path, over: list[str]) -> None:
    """A trained trial's measured figures; `over`: the budgets its file broke."""
    trial.set_user_attr("trained", True)
    trial.set_user_attr("params", result.params)
    trial.set_user_attr("size_kb", result.size_kb)
    trial.set_user_attr("macs", result.macs)
    trial.set_user_attr("ram_kb", result.ram_kb)
    trial.set_user_attr("latency_ms", round(result.latency_ms, 4))
    trial.set_user_attr("seconds", round(result.seconds, 3))
    if not math.isnan(result.train_seconds):
        trial.set_user_attr("train_seconds", round(result.train_seconds, 3))
    trial.set_user_attr("accuracy_before_compression", result.accuracy_before_compression)
    trial.set_user_attr("accuracy_post_training", result.accuracy_post_training)
    trial.set_user_attr("quantization_aware", result.quantization_aware)
    trial.set_user_attr("early_accuracy", result.early_accuracy)
    trial.set_user_attr("onnx_path", str(result.onnx_path.relative_to(folder)))
    if result.tflite_path is not None:
        trial.set_user_attr("tflite_path", str(result.tflite_path.relative_to(folder)))
        trial.set_user_attr("onnx_accuracy", result.onnx_accuracy)
        trial.set_user_attr("tflite_seconds", round(result.tflite_seconds, 3))
    # The deployed config (widths after pruning), from which the model rebuilds.
    trial.set_user_attr("config", result.config.to_dict())
    if over:
        trial.set_user_attr("reason", "over budget as measured: " + ", ".join(over))


def write_failed_in_storage(
    storage: optuna.storages.BaseStorage, trial_id: int, reason: str
) -> None:
    """The reason of a trial failed from outside its process (its process crashed)."""
    storage.set_trial_user_attr(trial_id, "reason", reason)


# What a copy of a trial starts with: a retry keeps the estimates of the same config, and
# a shrunk copy says where it comes from.
KEPT_BY_RETRY = (
    "estimated_params",
    "estimated_size_kb",
    "estimated_macs",
    "estimated_ram_kb",
    "fitted_from",
    "anchor",
    "rung",
    "rungs",
    "promoted_from",
)


def retry_attrs(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    kept = {key: trial.user_attrs[key] for key in KEPT_BY_RETRY if key in trial.user_attrs}
    return kept | {"retry_of": trial.number}


def anchor_attrs(name: str) -> dict[str, Any]:
    return {"anchor": name}


def promoted_attrs(record: TrialRecord, rung: int) -> dict[str, Any]:
    """What a promoted copy of `record` starts with: its rung, where it comes from, and
    the anchor's name when it is one."""
    attrs = {"rung": rung, "rungs": record.rungs, "promoted_from": record.number}
    return attrs | ({"anchor": record.anchor} if record.anchor else {})


def fitted_attrs(number: int) -> dict[str, Any]:
    return {"fitted_from": number}


def is_fitted_copy(trial: optuna.Trial) -> bool:
    return "fitted_from" in trial.user_attrs
