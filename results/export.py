"""`compsearch export`: retrain a trial's config for longer, compress it as the trial did,
verify the file against the budgets, and write the model with its card.

Everything written comes from one verified run: `model.onnx` (the deployable file),
`model.pt` (state dict plus the config that rebuilds the model, loadable with
`torch.load(..., weights_only=True)`) and `model.json` (the card: figures measured on the
file, the budgets, and the preprocessing a user must apply to feed the file).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from compsearch.spaces.budgets import Budgets, amount

if TYPE_CHECKING:  # a bad --trial is refused before pandas is imported
    import pandas as pd

EXPORT_EPOCH_FACTOR = 3  # an export trains this many times a trial's epochs by default
CARD_PACKAGES = ("compsearch", "torch", "onnx", "onnxruntime", "optuna", "numpy")


class ExportError(ValueError):
    """The trial cannot be exported, or its model broke a budget; says what to do."""


def best_feasible(frame: pd.DataFrame) -> pd.Series | None:
    """The row of the most accurate feasible trial (the smaller file on a tie), if any."""
    feasible = frame[frame["feasible"].astype(bool)]
    if feasible.empty:
        return None
    return feasible.sort_values(["accuracy", "size_kb"], ascending=[False, True]).iloc[0]


def choose_trial(
    study: optuna.Study, frame: Callable[[], pd.DataFrame], which: str
) -> optuna.trial.FrozenTrial:
    """`best`: the most accurate feasible trial (the smaller file on a tie), from the
    table `frame()` makes; or trial N, which must have been trained."""
    if which == "best":
        best = best_feasible(frame())
        if best is None:
            raise ExportError(
                f"study {study.study_name!r} has no feasible trial yet; run more trials "
                "(compsearch run) or widen the budgets in a new study"
            )
        number = int(best["number"])
    else:
        number = int(which)
    trials = {trial.number: trial for trial in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ExportError(
            f"study {study.study_name!r} has no trial {number} (trials 0 to {len(trials) - 1}); "
            "see compsearch show --all"
        )
    trial = trials[number]
    if trial.state != optuna.trial.TrialState.COMPLETE or not trial.user_attrs.get("trained"):
        reason = trial.user_attrs.get("reason") or trial.state.name.lower()
        raise ExportError(
            f"trial {number} was never trained to the end ({reason}); export a trained trial, "
            "for example --trial best"
        )
    return trial


@dataclass(frozen=True)
class Exported:
    folder: Path
    card: dict[str, Any]


def export_trial(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    folder: Path,
    epochs: int | None,
    teacher: str | None,
    device: str,
    data_source: tuple[str, Path],
    out: Path,
    say,
    on_epoch=None,
    on_step=None,
) -> Exported:
    """Retrain `trial`'s config for `epochs` (default EXPORT_EPOCH_FACTOR times the
    trial's) on the whole training split, compress it as the trial did, and write
    `folder/export/` only when the file meets every budget (ExportError otherwise, with
    the figures, and nothing written). `data_source` is (dataset name, data folder).
    `on_step(trial number, step)` is told each step, for the supervisor (see
    search/supervise.py)."""
    import torch

    from compsearch.objectives.catalog import CACHE_FOLDER
    from compsearch.objectives.data import load_dataset
    from compsearch.objectives.measure import onnx_accuracy
    from compsearch.objectives.teacher import prepare_teacher
    from compsearch.objectives.train import DeviceData
    from compsearch.objectives.trial import run_trial
    from compsearch.search.run import default_schedule
    from compsearch.search.study import SETTINGS_KEY, study_budgets
    from compsearch.spaces.config import TrialConfig
    from compsearch.spaces.space import SearchSpace, sample

    settings = study.user_attrs[SETTINGS_KEY]
    budgets = study_budgets(study)
    seed = int(settings.get("seed", 0))
    trained_config = TrialConfig.from_dict(trial.user_attrs["config"])
    epochs = epochs or EXPORT_EPOCH_FACTOR * trained_config.train.epochs
    name, data_dir = data_source
    data = load_dataset(name, seed=seed, data_dir=data_dir, cache_folder=out / CACHE_FOLDER)
    space = SearchSpace.from_dict(settings["space"])
    schedule = default_schedule(epochs, data.resolution)
    try:
        config = sample(optuna.trial.FixedTrial(trial.params), space, schedule)
    except ValueError as error:
        raise ExportError(f"trial {trial.number}'s parameters no longer fit: {error}") from None
    on_device = DeviceData(data, device)
    teacher = teacher or settings.get("teacher") or "none"
    step = (lambda text: on_step(trial.number, text)) if on_step else (lambda text: None)
    step(f"preparing the teacher ({teacher})")
    distillation = prepare_teacher(
        teacher, data, on_device, out, schedule, seed, None, say=say, on_epoch=on_epoch
    )
    say(
        f"exporting trial {trial.number}: {epochs} epochs on {len(data.train)} training images"
        f" (the trial had {trained_config.train.epochs}), teacher {teacher}"
    )
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as work:
        work = Path(work)
        result = run_trial(
            config, data, work, seed, on_device, on_epoch=on_epoch, distillation=distillation,
            on_step=step,
        )  # fmt: skip
        over = budgets.excess(result.params, result.size_kb, result.macs)
        if over:
            raise ExportError(
                f"the exported model of trial {trial.number} breaks the budgets "
                f"({', '.join(over)}): params {result.params:,}, size {result.size_kb:.1f} KB, "
                f"MACs {amount(result.macs)} against {budgets.describe()}; nothing was written. "
                "Export another trial (compsearch show) or a smaller one"
            )
        test_accuracy = onnx_accuracy(result.onnx_path, data.test, data, data.resolution)
        model = result.model
        torch.save(
            {"config": result.config.to_dict(), "state_dict": model.state_dict()},
            work / "model.pt",
        )
        card = model_card(study, trial, result, data, budgets, seed, epochs, teacher, test_accuracy)
        (work / "model.json").write_text(json.dumps(card, indent=2) + "\n")
        target = folder / "export"
        for stale in ("model.onnx", "model.pt", "model.json"):
            (target / stale).unlink(missing_ok=True)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("model.onnx", "model.pt", "model.json"):
            shutil.move(work / name, target / name)
    return Exported(target, card)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for package in CARD_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def preprocessing(data) -> dict[str, Any]:
    """What a user must do to an image to feed `model.onnx`, in the order it is done."""
    from compsearch.objectives.compress import INPUT_NAME, OUTPUT_NAME
    from compsearch.objectives.data import FOLDER_PREFIX

    if data.name == "digits":
        source = (
            "scikit-learn's load_digits(): pixel values 0..16, scaled to 0..255 as "
            "round(value * 255 / 16)"
        )
    elif data.name.startswith(FOLDER_PREFIX):
        source = (
            "each image file decoded with Pillow, cropped to its centred square, resized to "
            f"{data.resolution} x {data.resolution} (bilinear), "
            + ("converted to grayscale (L)" if data.channels == 1 else "converted to RGB")
        )
    else:
        source = f"{data.name} images as its standard files store them, 8-bit per channel"
    return {
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "batch": "any (dynamic first dimension)",
        "channels": data.channels,
        "color": "grayscale" if data.channels == 1 else "RGB",
        "resolution": data.resolution,
        "source_pixels": source,
        "steps": [
            "pixels as 8-bit values 0..255, shape (channels, resolution, resolution)",
            "divide by 255",
            "subtract mean[c] and divide by std[c] for each channel c",
        ],
        "mean": list(data.mean),
        "std": list(data.std),
        "output": "logits, one per class; the predicted class is the argmax",
        "class_names": list(data.class_names),
    }


def model_card(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    result,
    data,
    budgets: Budgets,
    seed: int,
    epochs: int,
    teacher: str,
    test_accuracy: float,
) -> dict[str, Any]:
    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    config = result.config
    return {
        "study": study.study_name,
        "trial": trial.number,
        "dataset": data.name,
        "images": {"train": len(data.train), "validation": len(data.val), "test": len(data.test)},
        "budgets": dataclasses.asdict(budgets),
        "validation_accuracy": result.accuracy,
        "test_accuracy": test_accuracy,
        "trial_validation_accuracy": finite(trial.values[0]) if trial.values else None,
        "accuracy_before_compression": result.accuracy_before_compression,
        "accuracy_post_training": result.accuracy_post_training,
        "quantization_aware": result.quantization_aware,
        "params": result.params,
        "size_kb": result.size_kb,
        "macs": result.macs,
        "precision": config.compress.precision,
        "pruning": {
            "fraction": config.compress.prune_fraction,
            "criterion": config.compress.prune_criterion,
            "scope": config.compress.prune_scope,
        },
        "epochs": epochs,
        "teacher": teacher,
        "seed": seed,
        "sha256": sha256(result.onnx_path),
        "files": {
            "model.onnx": "the deployable file; every figure here was measured on it",
            "model.pt": "state_dict and config; torch.load(path, weights_only=True)",
        },
        "preprocessing": preprocessing(data),
        "config": config.to_dict(),
        "packages": package_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
