"""The files of `compsearch export`, once search/ has retrained a trial and its file met
the budgets: `model.onnx` (the deployable file), `model.pt` (objectives/modelfile.py's
layout: the config that rebuilds the model beside its state dict, loadable with
`torch.load(..., weights_only=True)`) and `model.json` (the card: figures measured on the
file, the budgets, and the preprocessing a user must apply to feed the file); under `--format
tflite` also `model.tflite` and its C array `model_data.cc`/`.h`. Also which trial
`--trial` means.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compsearch.objectives.catalog import FOLDER_PREFIX, INPUT_NAME, OUTPUT_NAME
from compsearch.objectives.modelfile import save_model
from compsearch.results.records import TrialRecord, best_feasible
from compsearch.spaces.budgets import Budgets

if TYPE_CHECKING:
    from compsearch.objectives.data import Dataset
    from compsearch.objectives.trial import TrialResult

CARD_PACKAGES = ("compsearch", "torch", "onnx", "onnxruntime", "optuna", "numpy")
EXPORT_FILES = ("model.onnx", "model.pt", "model.json")
TFLITE_FILES = ("model.tflite", "model_data.cc", "model_data.h")  # export --format tflite


class ExportError(ValueError):
    """The trial cannot be exported, or its model broke a budget; says what to do."""


def choose_trial(
    study_name: str, records: list[TrialRecord], budgets: Budgets, which: str
) -> TrialRecord:
    """`best`: the most accurate feasible trial (the smaller file on a tie); or trial N,
    which must have been trained."""
    if which == "best":
        best = best_feasible(records, budgets)
        if best is None:
            raise ExportError(
                f"study {study_name!r} has no feasible trial yet; run more trials "
                "(compsearch run) or widen the budgets in a new study"
            )
        return best
    number = int(which)
    by_number = {record.number: record for record in records}
    if number not in by_number:
        raise ExportError(
            f"study {study_name!r} has no trial {number} (trials 0 to {len(records) - 1}); "
            "see compsearch show --all"
        )
    record = by_number[number]
    if not record.trained:
        reason = record.reason.split("; run again as")[0] or record.state.lower()
        raise ExportError(
            f"trial {number} was never trained to the end ({reason}); export a trained trial, "
            "for example --trial best"
        )
    return record


def write_export(folder: Path, work: Path, result: TrialResult, card: dict[str, Any]) -> Path:
    """`folder/export/` from the verified `result`, whose model.onnx run_trial wrote in
    `work`, and its `card`; the files of an earlier export are replaced only once the new
    ones are written."""
    save_model(
        work / "model.pt", result.model, result.config.arch, result.config,
        flip_test_time_augmentation=card["flip_test_time_augmentation"],
    )  # fmt: skip
    (work / "model.json").write_text(json.dumps(card, indent=2) + "\n")
    target = folder / "export"
    for stale in EXPORT_FILES + TFLITE_FILES:
        (target / stale).unlink(missing_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_FILES + TFLITE_FILES:
        if name in EXPORT_FILES or (work / name).exists():
            shutil.move(work / name, target / name)
    return target


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


def preprocessing(data: Dataset) -> dict[str, Any]:
    """What a user must do to an image to feed `model.onnx`, in the order it is done."""

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
    study_name: str,
    record: TrialRecord,
    result: TrialResult,
    data: Dataset,
    budgets: Budgets,
    seed: int,
    epochs: int,
    teacher: str,
    test_accuracy: float,
    candidates: list[dict[str, Any]] = (),
    flip: bool = False,
) -> dict[str, Any]:
    """The card: `candidates` are every compressed file the export measured to choose
    model.onnx (name, precision, validation accuracy, size, whether it fit); `flip`: the
    file averages the outputs on each image and its mirror."""

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    config = result.config
    return {
        "study": study_name,
        "trial": record.number,
        "dataset": data.name,
        "images": {"train": len(data.train), "validation": len(data.val), "test": len(data.test)},
        "budgets": dataclasses.asdict(budgets),
        "validation_accuracy": result.accuracy,
        "test_accuracy": test_accuracy,
        "trial_validation_accuracy": finite(record.accuracy),
        "accuracy_before_compression": result.accuracy_before_compression,
        "accuracy_post_training": result.accuracy_post_training,
        "quantization_aware": result.quantization_aware,
        "params": result.params,
        "size_kb": result.size_kb,
        "macs": result.macs,
        "ram_kb": result.ram_kb,  # peak activation memory of one inference of the file
        # median single-image latency of the file, onnxruntime, one thread, this machine
        "latency_ms": result.latency_ms,
        "flip_test_time_augmentation": flip,
        "precision": config.compress.precision,
        "pruning": {
            "fraction": config.compress.prune_fraction,
            "criterion": config.compress.prune_criterion,
            "scope": config.compress.prune_scope,
        },
        "candidates": list(candidates),
        "epochs": epochs,
        # with the fine-tune after pruning stretched (TrialConfig.epochs)
        "epochs_trained": config.epochs,
        "teacher": teacher,
        "seed": seed,
        "sha256": sha256(result.onnx_path),
        "files": {
            "model.onnx": "the deployable file; every figure here was measured on it"
            + (
                " (it runs the network on each image and on its mirror and averages the "
                "outputs; macs counts both runs)"
                if flip
                else ""
            ),
            "model.pt": "arch, config and state_dict; torch.load(path, weights_only=True)",
        },
        "preprocessing": preprocessing(data),
        "config": config.to_dict(),
        "packages": package_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
