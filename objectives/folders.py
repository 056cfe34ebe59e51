"""`folder:PATH` datasets: the user's own images, one sub-folder per class, decoded once into
square uint8 arrays and cached so the next run starts at once.

Layout: PATH/<class>/... or PATH/train/<class>/... with PATH/test/<class>/...; images may
sit deeper inside a class folder. Hidden files and folders (names starting with ".") and
files without an image suffix are not images.

Resolution: every image is cropped to its centred square and resized to R x R pixels, where
R is the median shorter side of the images (from up to SIZE_SAMPLE of them), rounded to a
multiple of 4 and clamped to [SMALLEST, LARGEST]. Multiples of 4 keep the half and
three-quarter training resolutions whole; the cap bounds memory (the whole dataset is held
as one tensor) and trial time, which grows with R^2.

Channels: grayscale (one channel) when every image is grey (R = G = B), else RGB.

Cache: CACHE/folder-<digest of PATH>-<key>.npy, where CACHE is the cache folder the caller
names (the command line's: OUT/cache), by default $XDG_CACHE_HOME/compsearch (else
~/.cache/compsearch); never inside PATH, which is the user's. The key covers every image's
relative path, size and modification time, the class folders and the resolution rule, so
adding, removing or changing an image re-decodes everything.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rich.console import Console

from compsearch.objectives.errors import DataError, one_line

IMAGE_SUFFIXES = frozenset(
    (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp")
)
SMALLEST = 8  # pixels: digits' size, the smallest images the search spaces are built for
LARGEST = 64  # pixels
MULTIPLE = 4  # pixels
SIZE_SAMPLE = 2000  # images whose headers set the resolution: the median is stable by then
# Changes whenever the decoding does, so caches written by another rule are not used.
RULE = "median-shorter-side/x4/8..64/centre-crop/bilinear/grey-if-all-grey/v1"
KEY_DIGITS = 20  # hexadecimal digits of the sha256 kept in the cache's name
CHUNK = 256  # images per decoding task: large enough to amortise the thread hand-off
ORIENTATION = 0x0112  # the EXIF tag
SHOWN_ERRORS = 5  # unreadable images named in the error; the rest are counted
# Images each class needs: one to train on and one for validation, plus one held out for
# testing when there is no test/ folder.
MINIMUM_WITH_TEST = 2
MINIMUM_WITHOUT_TEST = 3


class ImageFile(NamedTuple):
    """One image file as listed. A named tuple, not a dataclass: a folder may list a
    million of them, and a frozen dataclass is several times slower to build."""

    path: str
    relative: str  # to PATH, with "/" separators: the cache key must not depend on PATH
    label: int
    test: bool  # from test/
    size: int  # bytes
    modified: int  # nanoseconds since the epoch


@dataclass(frozen=True)
class FolderImages:
    images: np.ndarray  # uint8 (N, C, R, R): train/ (or all) images, then test/ ones
    labels: np.ndarray  # int64 (N,)
    test: np.ndarray  # bool (N,): the image comes from test/
    class_names: tuple[str, ...]
    has_test: bool  # PATH holds train/ and test/


def read_image_folder(
    root: Path, console: Console | None = None, cache_folder: Path | None = None
) -> FolderImages:
    """The images under `root`, from the cache in `cache_folder` (default:
    user_cache_folder()) when it matches the files, else decoded and cached there."""
    files, class_names, has_test = list_images(root)
    key = cache_key(files, class_names, has_test)
    stem = cache_stem(root, cache_folder or user_cache_folder())
    cached = read_cache(cache_path(stem, key), len(files))
    if cached is not None:
        return FolderImages(cached, *label_arrays(files), class_names, has_test)
    console = console or Console(stderr=True)
    resolution = choose_resolution(files)
    images = decode_images(root, files, resolution, console)
    written = write_cache(stem, key, images)
    if console.is_terminal:
        where = f"cached in {written}" if written else "no writable place to cache them"
        console.print(
            f"[dim]decoded {len(files)} images of {root} at {resolution}x{resolution}x"
            f"{images.shape[1]}; {where}[/]",
            highlight=False,
        )
    return FolderImages(images, *label_arrays(files), class_names, has_test)


def label_arrays(files: Sequence[ImageFile]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([file.label for file in files], dtype=np.int64),
        np.array([file.test for file in files], dtype=bool),
    )


# Listing


def visible_folders(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError as error:
        raise DataError(f"cannot list {folder} ({one_line(error)})") from None


def list_images(root: Path) -> tuple[list[ImageFile], tuple[str, ...], bool]:
    """Every image under `root` in a fixed order (train before test, by class, by path),
    the class names (sorted folder names) and whether `root` has train/ and test/."""
    if not root.is_dir():
        raise DataError(
            f"folder:{root}: {root} is not a folder; give a folder that holds one sub-folder "
            "of images per class"
        )
    top = visible_folders(root)
    has_test = "train" in top and "test" in top
    if has_test:
        class_names = tuple(visible_folders(root / "train"))
        test_names = tuple(visible_folders(root / "test"))
        if test_names != class_names:
            only_train = sorted(set(class_names) - set(test_names))
            only_test = sorted(set(test_names) - set(class_names))
            raise DataError(
                f"folder:{root}: train/ and test/ must hold the same class folders, but "
                + "; ".join(
                    part
                    for part in (
                        f"only train/ has {', '.join(only_train)}" if only_train else "",
                        f"only test/ has {', '.join(only_test)}" if only_test else "",
                    )
                    if part
                )
            )
        splits = [(root / "train", False), (root / "test", True)]
    elif "train" in top or "test" in top:
        present, absent = ("train", "test") if "train" in top else ("test", "train")
        raise DataError(
            f"folder:{root}: {root} has {present}/ but no {absent}/; give both, each holding "
            "one folder per class, or put the class folders directly in it"
        )
    else:
        class_names = tuple(top)
        splits = [(root, False)]
    if len(class_names) < 2:
        holds = f"one class folder ({class_names[0]})" if class_names else "no class folders"
        raise DataError(
            f"folder:{root}: {splits[0][0]} holds {holds}; a classifier needs at least two, "
            "one sub-folder of images per class"
        )
    files: list[ImageFile] = []
    too_few = []
    for split, test in splits:
        minimum = 1 if test else (MINIMUM_WITH_TEST if has_test else MINIMUM_WITHOUT_TEST)
        for label, name in enumerate(class_names):
            folder = split / name
            relative = folder.relative_to(root).as_posix()
            found = list(walk_images(str(folder), relative, label, test))
            if len(found) < minimum:
                too_few.append(f"{relative} ({len(found)})")
            files += found
    if too_few:
        raise DataError(
            f"folder:{root}: too few images in {', '.join(too_few)}; each class needs at least "
            f"{MINIMUM_WITH_TEST if has_test else MINIMUM_WITHOUT_TEST} for training and "
            f"validation{'' if has_test else ' and testing'}"
            f"{' (and one in test/)' if has_test else ''}: add images or remove the folder "
            f"(images end in {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files, class_names, has_test


def walk_images(folder: str, relative: str, label: int, test: bool) -> Iterator[ImageFile]:
    """Image files below `folder`, sorted by name, hidden ones skipped. Linked folders
    inside a class are not followed (a link cycle would never end); linked files are."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as error:
        raise DataError(f"cannot list {folder} ({one_line(error)})") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                yield from walk_images(entry.path, f"{relative}/{entry.name}", label, test)
            elif "." + entry.name.rpartition(".")[2].lower() in IMAGE_SUFFIXES and entry.is_file():
                status = entry.stat()
                yield ImageFile(
                    entry.path,
                    f"{relative}/{entry.name}",
                    label,
                    test,
                    status.st_size,
                    status.st_mtime_ns,
                )
        except OSError as error:
            raise DataError(f"cannot read {entry.path} ({one_line(error)})") from None


# Resolution and decoding


def choose_resolution(files: Sequence[ImageFile]) -> int:
    """The median shorter side of (a spread-out sample of) the images, rounded to a
    multiple of MULTIPLE and clamped to [SMALLEST, LARGEST]. Only headers are read."""
    from PIL import Image

    count = min(len(files), SIZE_SAMPLE)
    picks = np.unique(np.linspace(0, len(files) - 1, count).round().astype(int))
    sides = []
    for index in picks:
        try:
            with Image.open(files[index].path) as image:
                sides.append(min(image.size))
        except Exception:  # decoding reports every unreadable image
            continue
    if not sides:
        return SMALLEST
    rounded = MULTIPLE * int(float(np.median(sides)) / MULTIPLE + 0.5)
    return min(LARGEST, max(SMALLEST, rounded))


def decode_image(path: str | Path, resolution: int) -> np.ndarray:
    """One image as uint8 (R, R) if grayscale or (R, R, 3): its centred square, resized."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        # JPEGs can decode at 1/2, 1/4 or 1/8 scale directly: far faster for photos, and
        # still at least `resolution` pixels on each side.
        image.draft(None, (resolution, resolution))
        # EXIF orientation: turn the image as viewers show it. Parsing EXIF costs as much as
        # decoding a tiny image, so only images that carry it are looked at.
        has_exif = "exif" in image.info or image.format == "TIFF"
        if has_exif and image.getexif().get(ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
            # 16-bit grayscale: keep the high byte (Pillow's own conversion clips at 255).
            image = Image.fromarray((np.asarray(image, dtype=np.int64) >> 8).astype(np.uint8))
        if image.mode in ("P", "PA"):  # through RGBA: Pillow warns on palette transparency
            image = image.convert("RGBA")
        mode = "L" if image.mode in ("1", "L", "LA", "I", "F") else "RGB"
        image = image.convert(mode)
        width, height = image.size
        side = min(width, height)
        box = ((width - side) // 2, (height - side) // 2)
        box = (*box, box[0] + side, box[1] + side)
        if side == resolution:  # no resampling: pixels stay exactly as stored
            image = image.crop(box) if width != height else image
        else:
            image = image.resize((resolution, resolution), Image.Resampling.BILINEAR, box=box)
        return np.asarray(image, dtype=np.uint8)


def decode_chunk(
    files: Sequence[ImageFile], resolution: int, out: np.ndarray, start: int
) -> tuple[list[tuple[str, str]], bool]:
    """Decode `files` into out[start:]; the unreadable ones (relative path, reason) and
    whether every readable one is grey."""
    from PIL import UnidentifiedImageError

    failures = []
    grey = True
    for offset, file in enumerate(files):
        try:
            pixels = decode_image(file.path, resolution)
        except UnidentifiedImageError:
            failures.append((file.relative, "not an image Pillow can read"))
            continue
        except Exception as error:  # damaged files raise many kinds of errors
            failures.append((file.relative, one_line(error)))
            continue
        if pixels.ndim == 2:
            out[start + offset] = pixels
        else:
            out[start + offset] = pixels.transpose(2, 0, 1)
            grey = grey and bool(
                (pixels[..., 0] == pixels[..., 1]).all()
                and (pixels[..., 1] == pixels[..., 2]).all()
            )
    return failures, grey


def decode_images(
    root: Path, files: Sequence[ImageFile], resolution: int, console: Console
) -> np.ndarray:
    """All images as uint8 (N, C, R, R); DataError naming the unreadable ones, if any."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    out = np.empty((len(files), 3, resolution, resolution), dtype=np.uint8)
    failures: list[tuple[str, str]] = []
    grey = True
    # Pillow releases the GIL while decoding and resizing, so threads help with large
    # images; for tiny ones they cost little.
    workers = min(8, os.cpu_count() or 1)
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    pool = ThreadPoolExecutor(workers)
    try:
        with progress:
            task = progress.add_task(
                f"decoding {root} at {resolution}x{resolution}", total=len(files)
            )
            starts = range(0, len(files), CHUNK)
            jobs = [
                pool.submit(decode_chunk, files[start : start + CHUNK], resolution, out, start)
                for start in starts
            ]
            for start, job in zip(starts, jobs, strict=True):
                chunk_failures, chunk_grey = job.result()
                failures += chunk_failures
                grey = grey and chunk_grey
                progress.advance(task, min(CHUNK, len(files) - start))
    finally:
        # On Ctrl-C, drop the chunks not started instead of decoding them all first.
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        shown = "; ".join(f"{path} ({reason})" for path, reason in failures[:SHOWN_ERRORS])
        more = f" and {len(failures) - SHOWN_ERRORS} more" if len(failures) > SHOWN_ERRORS else ""
        raise DataError(
            f"folder:{root}: {len(failures)} of {len(files)} images cannot be read: {shown}"
            f"{more}; fix or remove them"
        )
    return np.ascontiguousarray(out[:, :1]) if grey else out


# Cache


def cache_key(files: Sequence[ImageFile], class_names: tuple[str, ...], has_test: bool) -> str:
    listing = [(f.relative, f.size, f.modified) for f in files]
    text = json.dumps([RULE, SIZE_SAMPLE, has_test, class_names, listing], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_DIGITS]


def user_cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "compsearch"


def cache_stem(root: Path, cache_folder: Path) -> Path:
    """Where the cache of `root` is, less the key: named after its absolute path."""
    name = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_folder / f"folder-{name}"


def cache_path(stem: Path, key: str) -> Path:
    # The key in the name: a stale cache is told apart without opening it.
    return stem.with_name(f"{stem.name}-{key}.npy")


def read_cache(path: Path, count: int) -> np.ndarray | None:
    """The cached images, or None when `path` is absent or not a cache of `count` images."""
    if not path.is_file():
        return None
    try:
        # Mapped, not read: the split into train, validation and test copies it anyway.
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # a damaged cache is rebuilt, whatever is wrong with it
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != count:
        return None
    return images


def write_cache(stem: Path, key: str, images: np.ndarray) -> Path | None:
    """Write the cache and remove stale ones of the same folder beside it; the path
    written, or None when it could not be. Written under another name and renamed, so a
    reader never sees half a file."""
    path = cache_path(stem, key)
    temporary = stem.with_name(f".{stem.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            np.save(file, images, allow_pickle=False)
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        return None
    for stale in path.parent.glob(f"{stem.name}-*.npy"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return path
