"""`model.pt`, the one model-file layout, written and read here: a teacher's cache, a
teacher the user gives and an export's model file are all this.

    {"arch": ArchConfig as plain data (the widths pruning left), from which the model rebuilds,
     "config": TrialConfig as plain data, or None: how the model was trained and compressed,
     "state_dict": {name: tensor},
     "facts": {name: plain value}: validation accuracy, seed, dataset, ...}

Nothing in it is a pickled module, so it loads with `torch.load(..., weights_only=True)`.
torch is imported by `save_model` and `load_model` only: `check_model_file` looks at a path
before torch is imported, so that a wrong file is refused at once.
"""

from __future__ import annotations

import dataclasses
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compsearch.objectives.errors import DataError, one_line
from compsearch.spaces.config import ArchConfig, TrialConfig, arch_from_dict

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class SavedModel:
    model: nn.Module  # on the CPU, eval mode
    arch: ArchConfig
    config: TrialConfig | None
    facts: dict[str, Any]


def save_model(
    path: Path,
    model: nn.Module,
    arch: ArchConfig,
    config: TrialConfig | None = None,
    **facts: Any,
) -> Path:
    """Write `model` as its architecture, its config, its state dict and `facts`; a crash
    never leaves half a file under the real name."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    saved = {
        "arch": dataclasses.asdict(arch),
        "config": config.to_dict() if config is not None else None,
        "state_dict": state,
        "facts": facts,
    }
    partial = path.with_suffix(".partial")
    torch.save(saved, partial)
    partial.replace(path)
    return path


def load_model(path: Path, what: str = "teacher file") -> SavedModel:
    """The model in `path`, rebuilt from its architecture; DataError, naming the file as
    `what`, when it is not a compsearch model file."""
    import torch

    from compsearch.spaces.builder import build  # torch, like this function

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist; give a model.pt file") from None
    except Exception as error:  # torch raises many kinds for files it cannot unpickle
        reason = one_line(error)
        if reason.startswith("Weights only load failed"):
            reason = "it holds objects other than tensors and plain data"
        raise DataError(
            f"{what} {path} cannot be read as a compsearch model ({reason}); give a "
            "model.pt written by compsearch"
        ) from None
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise DataError(f"{what} {path} holds no state_dict; give a compsearch model.pt")
    if saved.get("arch") is None:
        raise DataError(
            f"{what} {path} holds no architecture (an older compsearch wrote it); export or "
            "train it again"
        )
    try:
        arch = arch_from_dict(saved["arch"])
        config = TrialConfig.from_dict(saved["config"]) if saved.get("config") else None
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DataError(
            f"{what} {path} holds an architecture compsearch cannot read "
            f"({one_line(error)}); give a compsearch model.pt"
        ) from None
    model = build(arch)
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as error:
        raise DataError(
            f"{what} {path} does not match its architecture: {one_line(error)}"
        ) from None
    return SavedModel(model.eval(), arch, config, dict(saved.get("facts") or {}))


def check_model_file(path: str, what: str) -> None:
    """A quick look that `path` is a file torch.save wrote (a zip holding data.pkl) whose
    top object holds a state dict, without torch; `load_model` reads it in full."""
    if not Path(path).is_file():
        raise DataError(f"{what} {path!r} is not a file; give none, auto or a model.pt path")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            pickled = archive.read(names[0]) if names else None
    except (zipfile.BadZipFile, OSError):
        pickled = None
    if pickled is None:
        raise DataError(
            f"{what} {path} is not a model file (torch.save's format); give none, auto or a "
            "model.pt that compsearch wrote"
        )
    if not holds_state_dict(pickled):
        raise DataError(f"teacher file {path} holds no state_dict; give a compsearch model.pt")


def holds_state_dict(pickled: bytes) -> bool:
    """Whether a pickle's top object is a dict with a "state_dict" key, read from its
    opcodes without unpickling anything (a model file's tensors need torch to load)."""
    try:
        opcodes = [op.name for op, _, _ in pickletools.genops(pickled)]
    except Exception:  # not a pickle at all: genops raises several kinds
        return False
    first = next((name for name in opcodes if name not in ("PROTO", "FRAME")), None)
    return first == "EMPTY_DICT" and b"state_dict" in pickled
