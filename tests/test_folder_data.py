"""`folder:PATH` datasets: images of any size and mode written by the test with Pillow,
decoded once into square arrays and cached."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compsearch.objectives import folders
from compsearch.objectives.data import DataError, load_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _user_cache_in_tmp(tmp_path, monkeypatch):
    # Caches go to the user's cache unless a cache folder is given: keep it in the test.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


def caches(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "user-cache" / "compsearch").glob("folder-*.npy"))


def solid(size: tuple[int, int], colour, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def write_classes(root: Path, count: int = 4, size: tuple[int, int] = (20, 20)) -> None:
    """Two classes, red and blue squares as PNG."""
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for n in range(count):
            solid(size, colour).save(root / name / f"{n}.png")


def load(root: Path, **kwargs):
    return load_dataset(f"folder:{root}", seed=0, **kwargs)


def test_mixed_sizes_and_modes_become_one_rgb_square_size(tmp_path):
    root = tmp_path / "pets"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    # Shorter sides 24, 36, 40, 41, 48, 60 (median 40.5, rounded to 40).
    solid((24, 30), (200, 10, 10)).save(root / "cat" / "a.png")
    solid((50, 36), 90, "L").save(root / "cat" / "b.jpg")
    solid((40, 40), (10, 200, 10, 128), "RGBA").save(root / "cat" / "c.png")
    solid((41, 70), 3, "P").save(root / "dog" / "d.gif")
    solid((48, 48), (1, 2, 3), "CMYK").save(root / "dog" / "e.tiff")
    solid((60, 90), (0, 0, 250)).save(root / "dog" / "f.webp", lossless=True)
    (root / "dog" / "notes.txt").write_text("not an image, not counted")
    data = load_dataset(f"folder:{root}", seed=0, val_fraction=0.34)
    assert (data.channels, data.resolution, data.num_classes) == (3, 40, 2)
    assert data.class_names == ("cat", "dog") and data.flip
    assert len(data.train) + len(data.val) + len(data.test) == 6
    # The grey JPEG is repeated into three equal channels.
    images = np.concatenate([s.images.numpy() for s in (data.train, data.val, data.test)])
    grey = [image for image in images if (image[0] == image[1]).all() and image[0, 0, 0] == 90]
    assert len(grey) == 1 and (grey[0] == 90).all()


def test_the_resolution_is_the_median_shorter_side_rounded_and_clamped(tmp_path):
    cases = [((30, 30), 32), ((5, 9), 8), ((500, 300), 64), ((26, 100), 28), ((28, 28), 28)]
    for size, resolution in cases:
        root = tmp_path / f"{size[0]}x{size[1]}"
        write_classes(root, size=size)
        assert load(root).resolution == resolution, size


def test_all_grey_images_give_one_channel(tmp_path):
    root = tmp_path / "digits"
    for name, level in (("zero", 0), ("one", 255)):
        (root / name).mkdir(parents=True)
        for n in range(3):
            solid((16, 16), level, "L").save(root / name / f"{n}.png")
        # Grey content stored as RGB still counts as grey.
        solid((16, 16), (level, level, level)).save(root / name / "rgb.png")
        # 16-bit grayscale keeps its high byte.
        Image.fromarray(np.full((16, 16), level * 257, np.uint16)).save(root / name / "deep.png")
    data = load(root)
    assert data.channels == 1 and data.resolution == 16
    everything = np.concatenate([s.images.numpy() for s in (data.train, data.val, data.test)])
    labels = np.concatenate([s.labels.numpy() for s in (data.train, data.val, data.test)])
    # Classes are sorted folder names: "one" (255) is 0, "zero" (0) is 1.
    assert (everything[labels == 0] == 255).all() and (everything[labels == 1] == 0).all()


def test_pixels_keep_their_place_and_wide_images_are_centre_cropped(tmp_path):
    root = tmp_path / "marks"
    write_classes(root, size=(20, 20))
    wide = np.zeros((20, 30, 3), np.uint8)  # 20 rows, 30 columns: crop keeps columns 5..24
    wide[3, 5] = (255, 255, 255)  # becomes row 3, column 0 of the square
    wide[:, :5] = (0, 255, 0)  # cut away
    Image.fromarray(wide).save(root / "red" / "wide.png")
    found = folders.read_image_folder(root)
    assert found.images.shape[1:] == (3, 20, 20)
    index = [n for n, f in enumerate(folders.list_images(root)[0]) if f.relative == "red/wide.png"]
    image = found.images[index[0]]
    assert image[:, 3, 0].tolist() == [255, 255, 255]
    assert image[1].sum() == 255  # no green column survived the crop


def test_exif_orientation_turns_the_image_as_viewers_show_it(tmp_path):
    root = tmp_path / "photos"
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the left half ends on top
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for n in range(3):
            Image.fromarray(stored).save(root / name / f"{n}.jpg", exif=exif, quality=95)
    image = folders.read_image_folder(root).images[0]
    assert image.shape == (3, 20, 20)
    assert image[0, 2, 10] > 200 and image[2, 2, 10] < 50  # top: red
    assert image[2, 17, 10] > 200 and image[0, 17, 10] < 50  # bottom: blue


def test_train_and_test_folders_give_the_test_split(tmp_path):
    root = tmp_path / "split"
    write_classes(root / "train", count=5)
    write_classes(root / "test", count=2)
    data = load(root)
    assert len(data.test) == 4 and len(data.train) + len(data.val) == 10
    assert data.class_names == ("blue", "red")
    assert sorted(data.test.labels.tolist()) == [0, 0, 1, 1]


def test_without_a_test_folder_a_fixed_fifth_is_held_out(tmp_path):
    root = tmp_path / "flat"
    write_classes(root, count=10)
    first, second = load(root), load_dataset(f"folder:{root}", seed=7)
    assert len(first.test) == 4 and np.bincount(first.test.labels.numpy()).tolist() == [2, 2]
    # The seed moves the validation split, never the test split.
    assert first.test.images.equal(second.test.images)


def test_a_second_load_reads_the_cache_and_does_not_decode(tmp_path, monkeypatch):
    root = tmp_path / "cached"
    write_classes(root)
    first = load(root)
    assert len(caches(tmp_path)) == 1
    assert [path.name for path in root.rglob("*") if path.is_file()] == [
        path.name for path in root.rglob("*.png")
    ]  # nothing written into the user's folder

    def refuse(path, resolution):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(folders, "decode_image", refuse)
    second = load(root)
    assert second.train.images.equal(first.train.images) and second.mean == first.mean


def test_a_changed_file_refreshes_the_cache(tmp_path):
    root = tmp_path / "changing"
    write_classes(root)
    assert load(root).mean[1] == 0  # no green anywhere
    path = root / "red" / "0.png"
    solid((20, 20), (0, 255, 0)).save(path)
    later = path.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(later, later))  # even within the file system's mtime resolution
    assert load(root).mean[1] > 0
    assert len(caches(tmp_path)) == 1  # the stale one is gone
    (root / "blue" / "4.png").write_bytes((root / "blue" / "0.png").read_bytes())
    assert len(load(root).test) + len(load(root).train) + len(load(root).val) == 9


def test_a_cache_folder_given_holds_the_cache_and_the_images_stay_untouched(tmp_path, monkeypatch):
    root = tmp_path / "readonly"
    write_classes(root)
    before = sorted((path, path.stat().st_mtime_ns) for path in root.rglob("*"))
    load(root, cache_folder=tmp_path / "out" / "cache")
    assert len(list((tmp_path / "out" / "cache").glob("folder-*.npy"))) == 1
    assert not caches(tmp_path)
    assert sorted((path, path.stat().st_mtime_ns) for path in root.rglob("*")) == before
    monkeypatch.setattr(folders, "decode_image", None)  # any decoding would now fail
    load(root, cache_folder=tmp_path / "out" / "cache")


def test_a_damaged_cache_is_rebuilt(tmp_path):
    root = tmp_path / "damaged"
    write_classes(root)
    expected = load(root).train.images
    (cache,) = caches(tmp_path)
    cache.write_bytes(cache.read_bytes()[:100])
    assert load(root).train.images.equal(expected)


def test_unreadable_images_are_listed_not_skipped(tmp_path):
    root = tmp_path / "broken"
    write_classes(root)
    (root / "red" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    good = root / "blue" / "0.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(root / "blue" / "full.jpg")
    (root / "blue" / "cut.jpg").write_bytes((root / "blue" / "full.jpg").read_bytes()[:200])
    with pytest.raises(DataError) as caught:
        load(root)
    message = str(caught.value)
    assert "2 of 11 images cannot be read" in message and "\n" not in message
    assert "red/garbage.jpg (not an image Pillow can read)" in message
    assert "blue/cut.jpg" in message and "fix or remove them" in message
    assert good.name not in message
    assert not caches(tmp_path)  # nothing cached from a failed read


def test_many_unreadable_images_are_counted(tmp_path):
    root = tmp_path / "many"
    write_classes(root)
    for n in range(8):
        (root / "red" / f"bad{n}.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"8 of 16 images cannot be read: .* and 3 more; fix"):
        load(root)


@pytest.mark.parametrize(
    ("arrange", "fragment"),
    [
        (lambda r: (r / "red").mkdir(parents=True), "holds no class folders|one class folder"),
        (lambda r: write_classes(r) or (r / "green").mkdir(), r"too few images in green \(0\)"),
        (
            lambda r: write_classes(r) or [p.unlink() for p in (r / "blue").iterdir()],
            r"too few images in blue \(0\)",
        ),
        (
            lambda r: write_classes(r, count=2),
            r"too few images in blue \(2\), red \(2\); each class needs at least 3",
        ),
        (lambda r: r.mkdir(), "holds no class folders"),
        (lambda r: None, "is not a folder"),
        (lambda r: write_classes(r / "train"), "has train/ but no test/"),
        (
            lambda r: (
                write_classes(r / "train")
                or write_classes(r / "test")
                or (r / "test" / "green").mkdir()
            ),
            "only test/ has green",
        ),
        (
            lambda r: (
                write_classes(r / "train")
                or write_classes(r / "test")
                or [p.unlink() for p in (r / "test" / "red").iterdir()]
            ),
            r"too few images in test/red \(0\)",
        ),
    ],
)
def test_unusable_folders_say_what_is_wrong(tmp_path, arrange, fragment):
    root = tmp_path / "user"
    arrange(root)
    with pytest.raises(DataError, match=fragment) as caught:
        load(root)
    message = str(caught.value)
    assert message.startswith(f"folder:{root}: ") and "\n" not in message


def test_a_single_class_is_refused(tmp_path):
    root = tmp_path / "one"
    write_classes(root)
    for path in (root / "blue").iterdir():
        path.unlink()
    (root / "blue").rmdir()
    with pytest.raises(DataError, match=r"holds one class folder \(red\); a classifier needs"):
        load(root)


def shared_subset(tmp_path: Path, train: int, test: int) -> Path:
    """A few of the shared CIFAR-10 JPEGs, linked into a train/ and test/ layout."""
    source = SHARED / "cifar10-jpeg"
    if not source.is_dir():
        pytest.skip("../shared/data is not present")
    root = tmp_path / "cifar-subset"
    for split, count in (("train", train), ("test", test)):
        for folder in sorted((source / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for n in range(count):
                name = f"{n:04d}.jpg"
                (root / split / folder.name / name).symlink_to(folder / name)
    return root


def test_real_jpegs_from_the_shared_copy_decode_exactly(tmp_path):
    root = shared_subset(tmp_path, train=20, test=5)
    data = load_dataset(f"folder:{root}", seed=0, subset=60)
    assert (data.channels, data.resolution, data.num_classes) == (3, 32, 10)
    assert len(data.train) == 60 and len(data.test) == 50
    assert data.class_names[0] == "airplane" and data.class_names[-1] == "truck"
    # 32x32 images are not resampled: the pixels are Pillow's own decoding.
    expected = np.asarray(Image.open(SHARED / "cifar10-jpeg/test/airplane/0000.jpg").convert("RGB"))
    np.testing.assert_array_equal(data.test.images[0].numpy(), expected.transpose(2, 0, 1))


@pytest.mark.slow
def test_the_whole_shared_cifar10_copy_as_a_folder(tmp_path):
    import subprocess
    import sys

    source = SHARED / "cifar10-jpeg"
    if not source.is_dir():
        pytest.skip("../shared/data is not present")
    # The decoded cache goes below tmp_path, never into ../shared.
    data = load_dataset(f"folder:{source}", seed=0, cache_folder=tmp_path / "cache")
    assert any((tmp_path / "cache").rglob("*.npy")) or any((tmp_path / "cache").iterdir())
    assert len(data.train) + len(data.val) == 50_000 and len(data.test) == 10_000
    assert np.allclose(data.mean, (0.4913, 0.4821, 0.4465), atol=0.002)
    # The same images as the official-format batches rebuilt from this copy, class by class.
    script = source / "make_batches.py"
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, capture_output=True)
    batches = load_dataset("cifar10", seed=0, data_dir=tmp_path)
    for label in range(10):
        from_folder = data.test.images[data.test.labels == label]
        from_batches = batches.test.images[batches.test.labels == label]
        assert from_folder.equal(from_batches), label
