"""Bad input a user can type, each with the words its one-line error must hold.

Shared by tests/test_bad_input.py (exit code, one line, the study untouched) and
bench/bad_input_timing.py (how long each takes to be refused).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BUDGETS = ("--budget-params", "2e6", "--budget-kb", "300")
# The study every case runs beside: created by `run` with BUDGETS on digits under OUT.
OUT = "runs"


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    fragment: str  # the error line holds this
    arrange: Callable[[Path], None] | None = None  # writes the bad files under the root


def idx_gz(path: Path, array: np.ndarray, cut: int = 0) -> None:
    """An IDX file (MNIST's format), gzipped; `cut` bytes missing from the end."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = gzip.compress(header + array.astype(np.uint8).tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) - cut])


def truncated_mnist(root: Path) -> None:
    raw = root / "bad" / "mnist" / "raw"
    for split, count in (("train", 60), ("t10k", 10)):
        idx_gz(raw / f"{split}-images-idx3-ubyte.gz", np.zeros((count, 28, 28)), cut=40)
        idx_gz(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(count) % 10)


def image_classes(root: Path, names: tuple[str, ...], per_class: int = 4) -> None:
    for index, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            Image.new("RGB", (12, 12), (40 * index, 0, 255 - 40 * index)).save(folder / f"{n}.png")


def one_class(root: Path) -> None:
    image_classes(root / "bad" / "one", ("cats",))


def unreadable_image(root: Path) -> None:
    image_classes(root / "bad" / "broken", ("cats", "dogs"))
    (root / "bad" / "broken" / "dogs" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")


def empty_folder(root: Path) -> None:
    (root / "bad" / "empty").mkdir(parents=True, exist_ok=True)


def space_file(name: str, text: str) -> Callable[[Path], None]:
    def arrange(root: Path) -> None:
        (root / "bad").mkdir(exist_ok=True)
        (root / "bad" / name).write_text(text)

    return arrange


def run(*args: str) -> tuple[str, ...]:
    return ("run", *BUDGETS, *args)


CASES = [
    Case("budget 0", ("run", "--budget-params", "0", "--budget-kb", "300"),
         "--budget-params must be a number > 0"),
    Case("budget negative", ("run", "--budget-params", "2e6", "--budget-kb", "-300"),
         "--budget-kb must be a number > 0"),
    Case("budget NaN", ("run", "--budget-params", "nan", "--budget-kb", "300"),
         "--budget-params must be a number > 0"),
    Case("budget text", ("run", "--budget-params", "lots", "--budget-kb", "300"),
         "--budget-params must be a number > 0"),
    Case("budget infinite", ("run", "--budget-params", "2e6", "--budget-kb", "inf"),
         "--budget-kb must be a number > 0"),
    Case("budget missing", ("run", "--budget-params", "2e6"), "--budget-kb"),
    Case("MACs budget negative", run("--budget-macs", "-5"), "--budget-macs must be"),
    Case("budgets nothing can meet",
         ("run", "--budget-params", "10", "--budget-kb", "300", "--study", "tiny"),
         "no model in the search space meets the budgets"),
    Case("other budgets for an existing study",
         ("run", "--budget-params", "1e6", "--budget-kb", "300"), "was created with budgets"),
    Case("unknown dataset", run("--dataset", "imagenet"), "unknown dataset 'imagenet'"),
    Case("dataset files missing", run("--dataset", "mnist", "--data-dir", "bad/nothing"),
         "mnist"),
    Case("truncated data file", run("--dataset", "mnist", "--data-dir", "bad/mnist"),
         "cannot be read", truncated_mnist),
    Case("missing data folder", run("--dataset", "folder:bad/nowhere"), "is not a folder"),
    Case("empty data folder", run("--dataset", "folder:bad/empty"), "holds no class folders",
         empty_folder),
    Case("folder dataset with one class", run("--dataset", "folder:bad/one"),
         "holds one class folder", one_class),
    Case("unreadable image", run("--dataset", "folder:bad/broken"), "dogs/3.png",
         unreadable_image),
    Case("unreachable storage",
         run("--storage", "postgresql://user:pw@127.0.0.1:5999/none", "--study", "elsewhere"),
         "cannot open storage postgresql://user:***@127.0.0.1:5999/none"),
    Case("unknown sampler", run("--sampler", "annealing"), "unknown sampler 'annealing'"),
    Case("malformed space file", run("--space", "bad/malformed.toml"), "is not valid TOML",
         space_file("malformed.toml", "width = [8,")),
    Case("space file with an unknown key", run("--space", "bad/unknown.toml"),
         "unknown field 'widths'", space_file("unknown.toml", "widths = [8, 64]\n")),
    Case("epochs 1", run("--epochs", "1"), "--epochs must be at least 2"),
    Case("trials 0", run("--trials", "0"), "--trials must be a number > 0"),
    Case("negative seed", run("--seed", "-3"), "--seed must be a whole number"),
    Case("workers 0", run("--workers", "0"), "--workers must be a number > 0"),
    Case("unknown device", run("--device", "tpu"), "--device must be auto, cpu, cuda"),
    Case("teacher file missing", run("--teacher", "missing.pt"), "is not a file"),
    Case("distillation weight above 1", run("--distill-weight", "1.5"),
         "--distill-weight must be a number from 0 to 1"),
    Case("export of a trial that does not exist", ("export", "--trial", "99"),
         "has no trial 99"),
    Case("export of a trial by name", ("export", "--trial", "first"),
         "--trial must be best or a trial number"),
    Case("export for 1 epoch", ("export", "--epochs", "1"), "--epochs must be at least 2"),
    Case("show of a study that does not exist", ("show", "--study", "nothing"),
         "no study 'nothing'"),
    Case("plot with no study", ("plot", "--out", "bad/no-runs"), "no study under"),
]  # fmt: skip
