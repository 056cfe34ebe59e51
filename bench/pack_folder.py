"""Pack a folder of many small files into one file, and unpack it again, byte for byte.

The CIFAR-10 JPEG copy is 60,000 files of about 1 KB: one file of their bytes travels to
another machine faster than the files themselves, and its size is the files' bytes
alone, with no per-file overhead. The pack is an .npz of three uint8 arrays, readable with
numpy alone: every file's bytes one after the other, the file sizes, and the relative
paths joined by newlines. It is zlib-compressed: small JPEGs repeat the same headers and
tables, so the CIFAR-10 copy's 55 MB of files pack into about 19 MB.

    python bench/pack_folder.py pack ../shared/data/cifar10-jpeg .data/cifar10-jpeg.npz
    python bench/pack_folder.py unpack .data/cifar10-jpeg.npz .data/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np


def listing(folder: Path) -> list[str]:
    """Every regular file under `folder`, relative, sorted; hidden files and folders
    (caches such as compsearch's decoded images) are left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                found.append(str((Path(root) / name).relative_to(folder)))
    return found


def pack(folder: Path, target: Path) -> None:
    names = listing(folder)
    if not names:
        raise SystemExit(f"{folder}: no files to pack")
    if any("\n" in name for name in names):
        raise SystemExit(f"{folder}: a file name holds a newline; cannot pack it")
    contents = [(folder / name).read_bytes() for name in names]
    sizes = np.array([len(c) for c in contents], dtype=np.int64)
    blob = np.frombuffer(b"".join(contents), dtype=np.uint8)
    paths = np.frombuffer("\n".join(names).encode(), dtype=np.uint8)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, blob=blob, sizes=sizes, paths=paths)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()[:16]
    print(
        f"{len(names)} files, {blob.size:,} bytes -> {target} ({target.stat().st_size:,} bytes,"
        f" sha256 {digest}...)"
    )


def unpack(source: Path, folder: Path) -> None:
    started = time.perf_counter()
    with np.load(source, allow_pickle=False) as packed:
        blob, sizes, paths = packed["blob"], packed["sizes"], packed["paths"]
    names = paths.tobytes().decode().split("\n")
    if len(names) != len(sizes) or int(sizes.sum()) != blob.size:
        raise SystemExit(f"{source}: damaged pack ({len(names)} paths, {len(sizes)} sizes)")
    ends = np.cumsum(sizes)
    data = blob.tobytes()
    made = set()
    for name, end, size in zip(names, ends.tolist(), sizes.tolist(), strict=True):
        path = folder / name
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(data[end - size : end])
    print(
        f"{len(names)} files, {blob.size:,} bytes -> {folder} "
        f"in {time.perf_counter() - started:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="FOLDER -> PACK.npz")
    packing.add_argument("folder", type=Path)
    packing.add_argument("pack", type=Path)
    unpacking = commands.add_parser("unpack", help="PACK.npz -> FOLDER")
    unpacking.add_argument("pack", type=Path)
    unpacking.add_argument("folder", type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.folder, args.pack)
    else:
        unpack(args.pack, args.folder)


if __name__ == "__main__":
    main()
