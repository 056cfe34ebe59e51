"""Readers for datasets' standard distribution files, without torchvision.

Each reader checks what it reads and raises DataError saying which file is wrong and how.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from compsearch.objectives.errors import DataError, one_line

# IDX element types (the third byte of the magic number) and their numpy dtypes.
IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not, as an array of its declared shape."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path} cannot be read ({error}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number); download it again")
    dtype = IDX_TYPES[raw[2]]
    dimensions = raw[3]
    header = 4 + 4 * dimensions
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; download it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} bytes of data, but its header declares "
            f"shape {shape} ({expected} bytes): the file is truncated or damaged; download it "
            "again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


# What a CIFAR pickle may build: numpy arrays and the bytes inside them. Any other global
# means the file is not a CIFAR batch, and pickle would run code to build it.
PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, lists, dicts, strings and numbers, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        # numpy 2 renamed numpy.core to numpy._core; the official files name the old one.
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR "python version" file: a pickled dict, read as Python 2 wrote it (latin1).
    Keys written as bytes are turned into str so both kinds of copies read alike."""
    try:
        with open(path, "rb") as file:
            content = ArrayUnpickler(file, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a file; download the dataset again") from None
    except OSError as error:
        raise DataError(f"{path} cannot be read ({one_line(error)})") from None
    except Exception as error:  # a damaged pickle raises almost anything
        raise DataError(
            f"{path} is truncated or damaged (not a readable pickle: {one_line(error)}); "
            "download it again"
        ) from None
    if not isinstance(content, dict):
        raise DataError(
            f"{path} holds a {type(content).__name__}, not the dict of a CIFAR file; "
            "download it again"
        )
    return {
        key.decode("latin1") if isinstance(key, bytes) else key: value
        for key, value in content.items()
    }


def pickle_entry(content: dict[str, Any], key: str, path: Path) -> Any:
    if key not in content:
        raise DataError(
            f"{path} has no {key!r} entry (it has {', '.join(map(str, content)) or 'none'}); "
            "it is not the expected CIFAR file, download it again"
        )
    return content[key]


def check_labels(labels: Any, count: int, num_classes: int, path: Path) -> np.ndarray:
    """Labels as int64, checked to be `count` whole numbers in 0..num_classes - 1."""
    try:
        array = np.asarray(labels)
    except Exception:  # ragged or odd objects
        array = np.asarray([], dtype=object)
    if array.dtype.kind == "f" and np.isfinite(array).all() and (array == np.round(array)).all():
        array = array.astype(np.int64)  # MATLAB writes numbers as doubles unless told not to
    if array.ndim != 1 or array.dtype.kind not in "iu" or len(array) != count:
        raise DataError(
            f"{path} holds labels of shape {array.shape} and type {array.dtype}, expected "
            f"{count} whole numbers (one per image); the file is damaged, download it again"
        )
    array = array.astype(np.int64)
    if count and (array.min() < 0 or array.max() >= num_classes):
        raise DataError(
            f"{path} holds labels from {array.min()} to {array.max()}, outside 0..{num_classes - 1}"
            "; the file is damaged or belongs to another dataset, download it again"
        )
    return array


CIFAR_ROW = 3 * 32 * 32  # values in one image of a CIFAR batch


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 batch or CIFAR-100 split: `data` rows hold the R, G and B planes of a
    32x32 image one after the other, so each row reshapes to (3, 32, 32)."""
    content = read_pickle(path)
    data = pickle_entry(content, "data", path)
    labels = pickle_entry(content, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        kind = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else (type(data).__name__)
        )
        raise DataError(
            f"{path} holds 'data' as a {kind}, expected uint8 rows of 3072 pixels; "
            "download it again"
        )
    if data.shape[1] != CIFAR_ROW:
        raise DataError(
            f"{path} holds images of {data.shape[1]} values, expected {CIFAR_ROW} "
            "(3 x 32 x 32); download it again"
        )
    labels = check_labels(labels, len(data), num_classes, path)
    return data.reshape(-1, 3, 32, 32), labels


def read_label_names(path: Path, key: str) -> tuple[str, ...]:
    """Class names from a CIFAR meta file (`label_names` or `fine_label_names`)."""
    names = pickle_entry(read_pickle(path), key, path)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (str, bytes)) for n in names):
        raise DataError(f"{path} holds {key!r} that is not a list of names; download it again")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else n for n in names)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN's cropped digits: X of shape (32, 32, 3, N), y of shape (N, 1) in 1..10 with
    10 standing for the digit 0 (0 is taken as 0 too)."""
    from scipy.io import loadmat

    if not path.is_file():  # scipy's own message for a missing file is misleading
        raise DataError(f"{path} does not exist")
    try:
        content = loadmat(path, variable_names=("X", "y"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except NotImplementedError as error:  # MATLAB v7.3 files are HDF5
        raise DataError(
            f"{path} is a MATLAB file scipy cannot read ({one_line(error)}); SVHN's own "
            "files are MATLAB v5, download them again"
        ) from None
    except Exception as error:  # a damaged file raises many kinds of errors
        raise DataError(
            f"{path} is truncated or damaged (not a readable MATLAB file: {one_line(error)}); "
            "download it again"
        ) from None
    for key in ("X", "y"):
        if key not in content:
            raise DataError(f"{path} has no {key!r} variable; it is not SVHN's {path.name}")
    images, labels = content["X"], content["y"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise DataError(
            f"{path} holds X as {images.dtype} of shape {images.shape}, expected uint8 of "
            "shape (32, 32, 3, N); download it again"
        )
    labels = check_labels(labels.reshape(-1), images.shape[3], 11, path)
    labels[labels == 10] = 0
    # (H, W, C, N) to (N, C, H, W).
    return np.ascontiguousarray(images.transpose(3, 2, 0, 1)), labels


STL10_SIDE = 96  # pixels
STL10_IMAGE = 3 * STL10_SIDE * STL10_SIDE  # bytes


def read_stl10_images(path: Path) -> np.ndarray:
    """STL-10's binary images: each is 3 planes (R, G, B) of 96x96 written column by column
    (MATLAB's order), so the last two axes are swapped to get rows first."""
    raw = read_binary(path)
    if len(raw) == 0 or len(raw) % STL10_IMAGE:
        raise DataError(
            f"{path} holds {len(raw)} bytes, not a whole number of {STL10_SIDE}x{STL10_SIDE} "
            f"RGB images ({STL10_IMAGE} bytes each): the file is truncated or damaged; "
            "download it again"
        )
    images = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3, STL10_SIDE, STL10_SIDE)
    return images.transpose(0, 1, 3, 2)


def read_stl10_labels(path: Path, count: int) -> np.ndarray:
    """STL-10's labels: one byte per image, 1..10, returned as 0..9."""
    raw = np.frombuffer(read_binary(path), dtype=np.uint8)
    if len(raw) != count:
        raise DataError(
            f"{path} holds {len(raw)} labels but its images file holds {count} images: one "
            "of them is truncated or from another copy; download the dataset again"
        )
    if count and (raw.min() < 1 or raw.max() > 10):
        raise DataError(
            f"{path} holds labels from {raw.min()} to {raw.max()}, outside 1..10; "
            "the file is damaged, download it again"
        )
    return raw.astype(np.int64) - 1


def read_binary(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except OSError as error:
        raise DataError(f"{path} cannot be read ({one_line(error)})") from None


def read_names(path: Path) -> tuple[str, ...]:
    """Class names, one a line (STL-10's class_names.txt)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except OSError as error:
        raise DataError(f"{path} cannot be read ({one_line(error)})") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())
