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


def write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    def arrange(root: Path) -> None:
        (root / "bad").mkdir(exist_ok=True)
        (root / "bad" / name).write_bytes(data)

    return arrange


def random_files(folder: str, names: tuple[str, ...]) -> Callable[[Path], None]:
    """Files of random bytes under bad/FOLDER, as a damaged download would leave."""

    def arrange(root: Path) -> None:
        generator = np.random.default_rng(0)
        for name in names:
            path = root / "bad" / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(generator.integers(0, 256, 3000, dtype=np.uint8).tobytes())

    return arrange


CIFAR_FILES = tuple(f"cifar-10-batches-py/data_batch_{n}" for n in range(1, 6)) + (
    "cifar-10-batches-py/test_batch",
    "cifar-10-batches-py/batches.meta",
)


def zip_without_model(root: Path) -> None:
    import zipfile

    (root / "bad").mkdir(exist_ok=True)
    with zipfile.ZipFile(root / "bad" / "notes.pt", "w") as archive:
        archive.writestr("notes/readme.txt", "not a model")


def torch_file_without_model(root: Path) -> None:
    """A real torch.save file holding a plain list: loadable, but no model."""
    import torch

    (root / "bad").mkdir(exist_ok=True)
    torch.save([1, 2, 3], root / "bad" / "list.pt")


def a_file(name: str) -> Callable[[Path], None]:
    return write_bytes(name, b"just a file\n")


def a_folder(name: str) -> Callable[[Path], None]:
    def arrange(root: Path) -> None:
        (root / "bad" / name).mkdir(parents=True, exist_ok=True)

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
    Case("RAM budget text", run("--budget-ram", "lots"), "--budget-ram must be a number > 0"),
    # digits: 8x8 images of 1 channel; int8 holds the input and a 1-channel stem, 128 bytes.
    Case("RAM budget nothing can meet",
         ("run", *BUDGETS, "--budget-ram", "0.1", "--study", "tiny-ram"),
         "at least 0.1 KB of RAM (ram_kb 0.128 > 0.1)"),
    Case("budgets nothing can meet",
         ("run", "--budget-params", "10", "--budget-kb", "300", "--study", "tiny"),
         "no model in the search space meets the budgets"),
    Case("other budgets for an existing study",
         ("run", "--budget-params", "1e6", "--budget-kb", "300"), "was created with budgets"),
    Case("unknown objective", run("--objectives", "accuracy,speed"),
         "--objectives must be accuracy,size or accuracy,size,latency, but got 'accuracy,speed'"),
    Case("other objectives for an existing study", run("--objectives", "accuracy,size,latency"),
         "was created with --objectives accuracy,size, not accuracy,size,latency"),
    Case("unknown file format", run("--format", "tfl"),
         "--format must be one of onnx, tflite, but got 'tfl'"),
    Case("tflite files from a space without int8",
         run("--format", "tflite", "--space", "small.toml", "--study", "float-tflite"),
         "--format tflite writes int8 files, but the search space's precisions are fp32"),
    Case("tflite files from a space of leaky ReLU only",
         run("--format", "tflite", "--space", "bad/leaky.toml", "--study", "leaky-tflite"),
         "--format tflite keeps leaky_relu in float",
         space_file("leaky.toml", 'activations = ["leaky_relu"]\n')),
    Case("other format for an existing study", run("--format", "tflite"),
         "was created with --format onnx, not tflite"),
    Case("unknown dataset", run("--dataset", "imagenet"), "unknown dataset 'imagenet'"),
    Case("dataset files missing", run("--dataset", "mnist", "--data-dir", "bad/nothing"),
         "no mnist IDX files under"),
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
    Case("rungs 0", run("--rungs", "0"), "--rungs must be a number > 0"),
    Case("rungs 9", run("--rungs", "9"), "--rungs must be at most 5"),
    Case("fidelity", run("--fidelity", "minutes"), "unknown --fidelity 'minutes'"),
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
    # Names that would become paths outside --out.
    Case("study name climbing out of --out", run("--study", "../escaped"),
         "cannot name a folder under --out"),
    Case("study name with a separator", run("--study", "a/b"), "no path separators"),
    Case("study name that is a dot", run("--study", "."), "cannot name a folder"),
    Case("show of a study name climbing out", ("show", "--study", "../runs"),
         "cannot name a folder under --out"),
    Case("plot of a study name with a separator", ("plot", "--study", "x/y"),
         "cannot name a folder under --out"),
    Case("export of a study name climbing out", ("export", "--study", ".."),
         "cannot name a folder under --out"),
    # Files of any content or encoding.
    Case("space file not UTF-8", run("--space", "bad/latin1.toml"), "is not UTF-8 text",
         write_bytes("latin1.toml", "\xe9paisseur = [8, 16]\n".encode("latin-1"))),
    Case("space file of binary bytes", run("--space", "bad/binary.toml"), "is not UTF-8 text",
         write_bytes("binary.toml", bytes(range(256)))),
    Case("space file that is a folder", run("--space", "bad/spacedir"), "is a folder",
         a_folder("spacedir")),
    Case("space file missing", run("--space", "bad/absent.toml"), "cannot read space file"),
    Case("teacher file of text", run("--teacher", "bad/teacher.txt"),
         "is not a model file", a_file("teacher.txt")),
    Case("teacher file of binary bytes", run("--teacher", "bad/teacher.pt"),
         "is not a model file", write_bytes("teacher.pt", bytes(range(256)) * 4)),
    Case("teacher file that is a zip of something else", run("--teacher", "bad/notes.pt"),
         "is not a model file", zip_without_model),
    Case("teacher file holding no model", run("--teacher", "bad/list.pt"),
         "holds no state_dict", torch_file_without_model),
    Case("teacher file that is a folder", run("--teacher", "bad"), "is not a file"),
    Case("export teacher of binary bytes", ("export", "--teacher", "bad/teacher.pt"),
         "is not a model file", write_bytes("teacher.pt", bytes(range(256)) * 4)),
    Case("CIFAR-10 files of random bytes", run("--dataset", "cifar10", "--data-dir", "bad/cifar"),
         "is truncated or damaged", random_files("cifar", CIFAR_FILES)),
    Case("SVHN files of random bytes", run("--dataset", "svhn", "--data-dir", "bad/svhn"),
         "is truncated or damaged", random_files("svhn", ("train_32x32.mat", "test_32x32.mat"))),
    # Paths that cannot be used.
    Case("--out that is a file", run("--out", "bad/out-file"), "is a file, not a folder",
         a_file("out-file")),
    Case("--out below a file", run("--out", "bad/out-file/runs"), "is a file, not a folder",
         a_file("out-file")),
    Case("show --out that is a file", ("show", "--out", "bad/out-file"),
         "is a file, not a folder", a_file("out-file")),
    Case("--data-dir that is a file", run("--dataset", "mnist", "--data-dir", "bad/data-file"),
         "is a file, not a folder", a_file("data-file")),
    Case("folder dataset that is a file", run("--dataset", "folder:bad/data-file"),
         "is not a folder", a_file("data-file")),
    Case("export --data-dir that is a file", ("export", "--data-dir", "bad/data-file"),
         "is a file, not a folder", a_file("data-file")),
    # Storages: URLs and files.
    Case("storage URL of an unknown scheme", run("--storage", "ftp://127.0.0.1/study"),
         "cannot open storage ftp://"),
    Case("storage URL with no host", run("--storage", "mysql://", "--study", "x"),
         "cannot open storage mysql://"),
    Case("sqlite storage that is not a database", run("--storage", "sqlite:///bad/fake.db"),
         "cannot open storage sqlite:///bad/fake.db", a_file("fake.db")),
    Case("sqlite storage below a file", run("--storage", "sqlite:///bad/out-file/study.db"),
         "is a file, not a folder", a_file("out-file")),
    Case("journal storage that is not a journal", run("--storage", "bad/binary.toml"),
         "cannot open storage bad/binary.toml", write_bytes("binary.toml", bytes(range(256)))),
    Case("journal storage that is a folder", run("--storage", "bad/spacedir"),
         "is a folder", a_folder("spacedir")),
    Case("redis storage not listening", run("--storage", "redis://127.0.0.1:6390/0"),
         "cannot open storage redis://127.0.0.1:6390/0"),
    Case("show of an unreachable storage",
         ("show", "--storage", "mysql://root@127.0.0.1:3399/none"),
         "cannot open storage mysql://root@127.0.0.1:3399/none"),
    # Numbers and words.
    Case("timeout text", run("--timeout", "soon"), "--time must be a duration > 0"),
    Case("time in millions", run("--time", "2M"), "ambiguous: write minutes as 2m"),
    Case("time misspelt", run("--tim", "5m"), "unrecognized arguments: --tim"),
    Case("export for epochs and a time", ("export", "--epochs", "4", "--time", "2m"),
         "give --epochs or --time, not both"),
    Case("subset 0", run("--subset", "0"), "--subset must be a number > 0"),
    Case("subset fraction", run("--subset", "2.5"), "--subset must be a whole number"),
    Case("heartbeat 0", run("--heartbeat", "0"), "--heartbeat must be a number > 0"),
    Case("temperature text", run("--distill-temperature", "warm"),
         "--distill-temperature must be a number > 0"),
    Case("export on an unknown device", ("export", "--device", "gpu0"),
         "--device must be auto, cpu, cuda"),
    Case("export in an unknown format", ("export", "--format", "tfl"),
         "--format must be one of onnx, tflite"),
    Case("export of a negative trial", ("export", "--trial", "-1"),
         "--trial must be best or a trial number"),
]  # fmt: skip
