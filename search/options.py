"""What each job is asked to do, as typed, frozen options, checked when they are made.

Everything here is plain Python: a wrong value is refused (UsageError, whose message
names the command-line flag) before optuna or torch is imported, whether it came from
the command line or from a Python caller.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

from compsearch.objectives.catalog import (
    DISTILL_TEMPERATURE,
    DISTILL_WEIGHT,
    FOLDER_PREFIX,
    SHAPES,
)
from compsearch.objectives.modelfile import check_model_file
from compsearch.results.records import CHOICES_OF_OBJECTIVES, DEFAULT_OBJECTIVES
from compsearch.search.common import (
    DEFAULT_EPOCHS,
    DEFAULT_FIDELITY,
    DEFAULT_OUT,
    DEFAULT_RUNGS,
    DEFAULT_TIME,
    DEFAULT_TRIALS,
    FIDELITIES,
    HEARTBEAT_SECONDS,
    SAMPLERS,
    UsageError,
    storage_url,
)
from compsearch.spaces.budgets import Budgets
from compsearch.spaces.config import FILE_FORMATS as FORMATS
from compsearch.spaces.space import SearchSpace, load_space, space_for

# A study's name is its folder's name under --out: one path component, never "..".
STUDY_NAME = re.compile(r"\w[\w.+=@-]{0,127}")
MAX_RUNGS = 5
DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_study_name(name: str, where: str = "--study") -> str:
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        raise UsageError(
            f"{where} {name!r} cannot name a folder under --out: use 1 to 128 letters, digits "
            "and . _ - + = @, starting with a letter, digit or _ (no path separators, no "
            "'..')"
        )
    return name


def check_folder(path: Path, what: str) -> Path:
    """`path` can be a folder (it is one, or can be made): else a usage error, before
    anything is loaded. Nothing is created here."""
    for place in (path, *path.parents):
        if place.exists():
            if place.is_dir():
                return path
            where = "" if place == path else f": {place}"
            raise UsageError(f"{what} {path}{where} is a file, not a folder; give a folder")
    return path


def check_file_path(path: Path, what: str) -> Path:
    """A file that exists or can be written: not a folder, below no file."""
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file path")
    check_folder(path.parent, f"{what}'s folder")
    return path


def check_storage(url: str) -> None:
    """A storage URL's local file, checked as a path before the storage is opened."""
    if url.startswith("sqlite:///"):
        check_file_path(Path(url.removeprefix("sqlite:///")), "--storage")
    elif "://" not in url:
        check_file_path(Path(url), "--storage")


def check_device_name(name: str) -> str:
    if not isinstance(name, str) or not DEVICE_NAMES.fullmatch(name):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:K, but got {name!r}")
    return name


def check_teacher(spec: str | None) -> None:
    if spec not in (None, "none", "auto"):
        check_model_file(spec, "--teacher")


def parse_objectives(text: str) -> tuple[str, ...]:
    """--objectives: accuracy,size (the default) or accuracy,size,latency, in any order."""
    names = tuple(name.strip().lower() for name in text.split(","))
    for choice in CHOICES_OF_OBJECTIVES:
        if sorted(names) == sorted(choice):
            return choice
    raise UsageError(
        f"--objectives must be accuracy,size or accuracy,size,latency, but got {text!r}"
    )


def check_number(value: object, flag: str, low: float = 0, whole: bool = False) -> None:
    """A finite number above `low` (at least `low` for whole numbers)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or (value < low if whole else value <= low):
        kind = f"a whole number >= {low:g}" if whole else f"a number > {low:g}"
        raise UsageError(f"{flag} must be {kind}, but got {value!r}")
    if whole and value != int(value):
        raise UsageError(f"{flag} must be a whole number, but got {value!r}")


def check_epochs(epochs: int | None) -> None:
    if epochs is None:
        return
    check_number(epochs, "--epochs", low=1, whole=True)
    if epochs < 2:
        raise UsageError(f"--epochs must be at least 2 (train, then fine-tune), but got {epochs}")


def check_rungs(rungs: int) -> None:
    check_number(rungs, "--rungs", low=1, whole=True)
    if rungs > MAX_RUNGS:
        raise UsageError(
            f"--rungs must be at most {MAX_RUNGS} (each rung trains a third of the next), "
            f"but got {rungs}"
        )


def default_study_name(dataset: str) -> str:
    """The dataset's name; for `folder:PATH`, the name of that folder, with characters a
    study name may not hold replaced by '-'."""
    if dataset.startswith(FOLDER_PREFIX):
        name = Path(dataset.removeprefix(FOLDER_PREFIX)).resolve().name
        return re.sub(r"[^\w.+=@-]", "-", name).lstrip(".-+=@")[:128] or "folder"
    return dataset


def as_path(value: Path | str | None) -> Path | None:
    return None if value is None else Path(value)


@dataclass(frozen=True)
class Location:
    """Which study a command means: --study under --out, or in --storage."""

    study: str | None = None
    out: Path = DEFAULT_OUT
    storage: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.study is not None:
            check_study_name(self.study)
        check_folder(self.out, "--out")
        if self.storage is not None:
            check_storage(self.storage)


@dataclass(frozen=True)
class RunOptions:
    """`compsearch run`'s arguments, typed; the defaults are the command's."""

    budget_params: float
    budget_kb: float
    budget_macs: float | None = None
    budget_ram: float | None = None  # KB of peak activation memory (spaces/memory.py)
    budget_latency: float | None = None  # ms, median single-image latency (one thread)
    dataset: str = "digits"
    data_dir: Path = Path("data")
    trials: int = DEFAULT_TRIALS
    # Seconds of the search's wall time (no trial starts whose predicted end lies past
    # it); None: no limit.
    time: float | None = DEFAULT_TIME
    sampler: str = "tpe"
    subset: int | None = None
    space: Path | None = None  # a TOML file narrowing or widening the space
    epochs: int = DEFAULT_EPOCHS
    seed: int = 0
    device: str = "auto"
    teacher: str = "none"  # none, auto or a model.pt path
    distill_weight: float = DISTILL_WEIGHT
    distill_temperature: float = DISTILL_TEMPERATURE
    workers: int = 1
    heartbeat: int = HEARTBEAT_SECONDS  # seconds between a worker's heartbeats
    anchors: bool = True  # known architectures (search/anchors.py) as a new study's first trials
    # Fidelities of the successive halving (search/fidelity.py); 1: every trial trains
    # --epochs on all --subset images.
    rungs: int = DEFAULT_RUNGS
    # What a rung counts (search/fidelity.py): "epochs" (x images) or "seconds".
    fidelity: str = DEFAULT_FIDELITY
    study: str | None = None
    out: Path = DEFAULT_OUT
    storage: str | None = None
    # What the search optimizes: DEFAULT_OBJECTIVES, or with "latency" as a third.
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    # The file each trial is measured as: "onnx", or "tflite" (int8 .tflite files in
    # LiteRT; every trial int8).
    format: str = "onnx"

    def __post_init__(self) -> None:
        check_format(self.format)
        object.__setattr__(
            self,
            "objectives",
            parse_objectives(
                self.objectives if isinstance(self.objectives, str) else ",".join(self.objectives)
            ),
        )
        for name in ("data_dir", "out", "space"):
            object.__setattr__(self, name, as_path(getattr(self, name)))
        for flag, value in (
            ("--budget-params", self.budget_params),
            ("--budget-kb", self.budget_kb),
        ):
            check_number(value, flag)
        if self.budget_macs is not None:
            check_number(self.budget_macs, "--budget-macs")
        if self.budget_ram is not None:
            check_number(self.budget_ram, "--budget-ram")
        if self.budget_latency is not None:
            check_number(self.budget_latency, "--budget-latency")
        check_number(self.trials, "--trials", low=1, whole=True)
        check_epochs(self.epochs)
        check_rungs(self.rungs)
        if self.fidelity not in FIDELITIES:
            raise UsageError(
                f"unknown --fidelity {self.fidelity!r}; choose one of {', '.join(FIDELITIES)}"
            )
        if self.subset is not None:
            check_number(self.subset, "--subset", low=1, whole=True)
        if self.time is not None:
            check_number(self.time, "--time")
        check_number(self.seed, "--seed", low=0, whole=True)
        if self.sampler not in SAMPLERS:
            raise UsageError(
                f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}"
            )
        weight = self.distill_weight
        if not isinstance(weight, int | float) or not 0 <= weight <= 1:
            raise UsageError(f"--distill-weight must be a number from 0 to 1, but got {weight!r}")
        check_number(self.distill_temperature, "--distill-temperature")
        check_teacher(self.teacher)
        check_number(self.workers, "--workers", low=1, whole=True)
        check_number(self.heartbeat, "--heartbeat", low=1, whole=True)
        check_device_name(self.device)
        is_folder = self.dataset.startswith(FOLDER_PREFIX)
        if self.dataset not in SHAPES and not is_folder:
            raise UsageError(f"unknown dataset {self.dataset!r}; available: {', '.join(SHAPES)}")
        if self.study is not None:
            check_study_name(self.study)
        check_folder(self.out, "--out")
        check_folder(self.data_dir, "--data-dir")
        check_storage(self.storage_url)

    @property
    def budgets(self) -> Budgets:
        return Budgets(
            self.budget_params, self.budget_kb, self.budget_macs, self.budget_ram,
            self.budget_latency,
        )  # fmt: skip

    @property
    def study_name(self) -> str:
        return self.study or default_study_name(self.dataset)

    @property
    def folder(self) -> Path:
        return self.out / self.study_name

    @property
    def storage_url(self) -> str:
        return storage_url(self.storage, self.folder)

    def known_space(self) -> SearchSpace | None:
        """The space asked for, when the dataset's shape is known without loading it;
        None for folder datasets, whose shape their images tell."""
        shape = SHAPES.get(self.dataset)
        if shape is None:
            return None
        return self.space_for(shape.channels, shape.num_classes, shape.resolution)

    def space_for(self, channels: int, num_classes: int, resolution: int) -> SearchSpace:
        """The default space for data of this shape, narrowed or widened by --space; int8
        only under --format tflite."""
        space = space_for(channels, num_classes, resolution)
        space = load_space(self.space, space) if self.space else space
        return for_format(space, self.format, self.space)

    def data_source(self) -> tuple[str, str]:
        """(dataset, data folder) as absolute paths, so `export` finds the same data from
        anywhere."""
        if self.dataset.startswith(FOLDER_PREFIX):
            path = Path(self.dataset.removeprefix(FOLDER_PREFIX)).resolve()
            return f"{FOLDER_PREFIX}{path}", str(path)
        return self.dataset, str(self.data_dir.resolve())

    def to_argv(self) -> list[str]:
        """These options as `compsearch run` arguments: how a worker process is started."""
        argv = []
        for option in fields(self):
            value = getattr(self, option.name)
            if value == option.default:
                continue
            flag = "--" + option.name.replace("_", "-")
            if value is None:  # only --time has a default that None overrides
                argv += [flag, "none"]
                continue
            if isinstance(value, bool):  # a switch: only its non-default form has a flag
                argv.append(flag if value else f"--no-{option.name.replace('_', '-')}")
            elif isinstance(value, tuple):
                argv += [flag, ",".join(value)]
            else:
                argv += [flag, repr(float(value)) if isinstance(value, float) else str(value)]
        return argv


def check_format(file_format: str) -> None:
    """--format: one of FORMATS, and tflite only where its extra is installed."""
    if file_format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, but got {file_format!r}")
    if file_format == "tflite":
        from compsearch.objectives.tflite import missing_tflite  # torch

        missing = missing_tflite()
        if missing:
            raise UsageError(missing)


# Activations ai-edge-quantizer's int8 recipe leaves in float in a .tflite file: leaky
# ReLU runs between a DEQUANTIZE and a QUANTIZE, on float32 tensors (a searched config's
# peak memory measured 138 KB against 32 KB for the same graph in int8).
FLOAT_IN_TFLITE = ("leaky_relu",)


def for_format(space: SearchSpace, file_format: str, space_file: Path | None) -> SearchSpace:
    """`space` as searched for `file_format`: .tflite files are int8, so under tflite its
    precisions narrow to int8 and its activations to those int8 keeps in int8 (an error
    when none are left)."""
    if file_format != "tflite":
        return space
    where = f" ({space_file})" if space_file else ""
    if "int8" not in space.precisions:
        raise UsageError(
            "--format tflite writes int8 files, but the search space's precisions are "
            f"{', '.join(space.precisions)}{where}; add int8 to them or use --format onnx"
        )
    activations = tuple(a for a in space.activations if a not in FLOAT_IN_TFLITE)
    if not activations:
        raise UsageError(
            f"--format tflite keeps {', '.join(space.activations)} in float, and the search "
            f"space has no other activation{where}; add relu, silu or hardswish to "
            "activations or use --format onnx"
        )
    return replace(space, precisions=("int8",), activations=activations)


@dataclass(frozen=True)
class ExportOptions:
    """`compsearch export`'s arguments, typed."""

    trial: int | str = "best"  # "best" (the most accurate feasible trial) or a number
    epochs: int | None = None  # None: EXPORT_EPOCH_FACTOR times the trial's, or from `time`
    time: float | None = None  # seconds of training, instead of `epochs`
    teacher: str | None = None  # None: what the study used
    data_dir: Path | None = None  # None: where the study read its data
    device: str = "auto"
    study: str | None = None
    out: Path = DEFAULT_OUT
    storage: str | None = None
    # The file averages the model's outputs on each image and its mirror (twice the MACs).
    flip: bool = False
    # "tflite": also an int8 .tflite file and its C array (objectives/tflite.py); None:
    # the study's --format ("onnx" for a study from before it).
    format: str | None = None

    def __post_init__(self) -> None:
        if self.format is not None:
            check_format(self.format)
        trial = str(self.trial).strip()
        if trial != "best" and not re.fullmatch(r"[0-9]+", trial):
            raise UsageError(f"--trial must be best or a trial number, but got {self.trial!r}")
        object.__setattr__(self, "trial", trial)
        check_epochs(self.epochs)
        if self.time is not None:
            check_number(self.time, "--time")
            if self.epochs is not None:
                raise UsageError("give --epochs or --time, not both")
        check_teacher(self.teacher)
        object.__setattr__(self, "data_dir", as_path(self.data_dir))
        if self.data_dir is not None:
            check_folder(self.data_dir, "--data-dir")
        check_device_name(self.device)
        object.__setattr__(self, "out", Path(self.out))

    @property
    def location(self) -> Location:
        return Location(self.study, self.out, self.storage)


@dataclass(frozen=True)
class WorkerRole:
    """How this process takes part in a run: worker 0 starts the others (the command line's
    hidden --worker-index, --finish-at and --threads set the rest)."""

    index: int = 0
    finish_at: int | None = None  # finished trials at which every worker stops
    threads: int | None = None  # CPU threads for torch
    # How to start a worker process: this interpreter and the program or module that
    # started this one (search/supervise.py's `launcher`).
    launcher: tuple[str, ...] = (sys.executable, "-m", "compsearch")
