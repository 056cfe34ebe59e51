"""Write CIFAR-10 as the cached tensor files airbench94.py loads, from the JPEG folder copy.

airbench94.py's CifarLoader reads `PATH/train.pt` and `PATH/test.pt` when they exist and
only otherwise downloads CIFAR-10 through torchvision. Each file is what it would have
saved itself: a dict with 'images', uint8 (N, 32, 32, 3) as torchvision's `CIFAR10.data`
holds them; 'labels', int64 (N,); 'classes', the class names in the official order. With
these files in `cifar10/` beside where it runs, airbench94.py runs offline, unmodified.

The folder holds train/<class>/*.jpg and test/<class>/*.jpg. When it has
train_labels.txt and test_labels.txt (the official labels in the official order, the k-th
image of class c in that order being <split>/<c>/<k:04d>.jpg), the images are written in
the official order, as torchvision would have them; airbench fits its whitening layer to
the first 5,000 training images, so they must not all be of one class. Without the lists,
the images are shuffled with a fixed seed.

    python bench/cifar_tensors.py ../shared/data/cifar10-jpeg cifar10
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SHUFFLE_SEED = 0


def image_files(folder: Path, split: str) -> tuple[list[Path], np.ndarray]:
    """The split's image files and labels (indices into CLASSES), in the official order
    when the folder has its label list."""
    root = folder / split
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if tuple(found) != CLASSES:
        raise SystemExit(f"{root}: class folders {found}, expected CIFAR-10's {list(CLASSES)}")
    listed = folder / f"{split}_labels.txt"
    if listed.is_file():
        labels = np.loadtxt(listed, dtype=np.int64).reshape(-1)
        seen = np.zeros(len(CLASSES), dtype=np.int64)
        files = []
        for label in labels.tolist():
            files.append(root / CLASSES[label] / f"{seen[label]:04d}.jpg")
            seen[label] += 1
        return files, labels
    files, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / name).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                files.append(path)
                labels.append(label)
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(files))
    return [files[i] for i in order], np.asarray(labels, dtype=np.int64)[order]


def decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if pixels.shape != (32, 32, 3):
        raise SystemExit(f"{path}: {pixels.shape[1]}x{pixels.shape[0]} pixels, expected 32x32")
    return pixels


def write_split(folder: Path, split: str, target: Path, limit: int | None) -> int:
    files, labels = image_files(folder, split)
    if limit is not None:
        files, labels = files[:limit], labels[:limit]
    with ThreadPoolExecutor(8) as pool:
        images = np.stack(list(pool.map(decode, files, chunksize=256)))
    torch.save(
        {
            "images": torch.from_numpy(images),
            "labels": torch.from_numpy(labels),
            "classes": list(CLASSES),
        },
        target,
    )
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the JPEG copy: train/ and test/ inside")
    parser.add_argument("out", type=Path, help="folder for train.pt and test.pt")
    parser.add_argument("--limit", type=int, help="first N images of each split (tests)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train.pt"), ("test", "test.pt")):
        started = time.perf_counter()
        count = write_split(args.folder, split, args.out / name, args.limit)
        print(
            f"{args.out / name}: {count} images in {time.perf_counter() - started:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
