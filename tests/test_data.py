"""Data sources: digits (real, bundled), synthetic, and ImageFolder roots."""

from __future__ import annotations

import io
import random
import re
import signal
import struct
import sys
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from sparsekit.errors import DataError, SparsekitError
from sparsekit.train.data import build_data


def test_digits_split_is_fixed_and_stratified() -> None:
    a, b = build_data("digits"), build_data("digits")
    assert (len(a.train), len(a.val)) == (1437, 360)
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.val.images, b.val.images)
    assert torch.bincount(a.val.labels).min() >= 35  # every digit present in validation
    image, label = a.val[0]
    assert image.shape == (1, 8, 8) and 0 <= int(label) < 10
    assert (a.num_classes, a.in_chans, a.img_size, a.patch_size) == (10, 1, 8, 4)


def test_digits_resize_and_training_shift() -> None:
    data = build_data("digits", img_size=16)
    assert data.train[0][0].shape == (1, 16, 16)
    torch.manual_seed(0)
    views = {tuple(data.train[3][0].flatten().tolist()) for _ in range(20)}
    assert len(views) > 1  # random shifts when training
    assert len({tuple(data.val[3][0].flatten().tolist()) for _ in range(5)}) == 1


def make_folder(root: Path, split: str, classes: list[str], n: int = 3) -> None:
    for c, name in enumerate(classes):
        (root / split / name).mkdir(parents=True)
        for i in range(n):
            color = (40 * c + 10 * i, 100, 200 - 30 * c)
            Image.new("RGB", (40, 30), color).save(root / split / name / f"{i}.png")


def test_image_folder(tmp_path: Path) -> None:
    make_folder(tmp_path, "train", ["cat", "dog"])
    make_folder(tmp_path, "val", ["cat", "dog"], n=2)
    data = build_data(str(tmp_path), img_size=32)
    assert (len(data.train), len(data.val), data.num_classes, data.in_chans) == (6, 4, 2, 3)
    image, label = data.val[0]
    assert image.shape == (3, 32, 32) and label in (0, 1)
    assert data.patch_size is None


def test_image_folder_errors(tmp_path: Path) -> None:
    make_folder(tmp_path, "train", ["cat", "dog"])
    with pytest.raises(SparsekitError, match="val is missing"):
        build_data(str(tmp_path))
    make_folder(tmp_path, "val", ["cat"])
    with pytest.raises(SparsekitError, match="same class folders"):
        build_data(str(tmp_path))


# --- symbolic links ------------------------------------------------------------------------
symlinks = pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges there")


class Hung(Exception):
    """Not an OSError, so that no `except OSError` in the code under test swallows it."""


@contextmanager
def deadline(seconds: float = 20.0):
    """Fail, rather than hang, if a regression lets the walk follow a link loop."""

    def expire(signum, frame):
        raise Hung(f"building the data took over {seconds} s: a symlink loop followed?")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def build(root: Path, **kwargs):
    with deadline():
        return build_data(str(root), img_size=32, **kwargs)


def per_class(dataset) -> dict[str, int]:
    return dict(Counter(dataset.classes[label] for _, label in dataset.samples))


def png(path: Path, color=(10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


@symlinks
def test_link_loops_finish_with_the_right_counts_and_are_listed(tmp_path: Path) -> None:
    make_folder(tmp_path, "train", ["cat", "dog"])
    make_folder(tmp_path, "val", ["cat", "dog"], n=2)
    train = tmp_path / "train"
    (train / "cat" / "loop").symlink_to("..")  # the split folder
    (train / "cat" / "self").symlink_to(".")
    (train / "dog" / "deep").mkdir()
    (train / "dog" / "deep" / "back").symlink_to("../..")  # train/ again, from further down
    for a, b in (("d1", "d2"), ("d2", "d1")):  # two folders linking to each other
        png(train / "dog" / a / "x.png")
        (train / "dog" / a / "other").symlink_to(f"../{b}")
    (tmp_path / "val" / "dog" / "again").symlink_to("../dog")
    data = build(tmp_path)
    assert per_class(data.train) == {"cat": 3, "dog": 5} and per_class(data.val) == {
        "cat": 2,
        "dog": 2,
    }
    real = tmp_path.resolve()
    assert sorted(data.skipped_links) == sorted(
        [
            f"train/cat/loop -> {real / 'train'} (loop)",
            f"train/cat/self -> {real / 'train' / 'cat'} (loop)",
            f"train/dog/deep/back -> {real / 'train'} (loop)",
            f"train/dog/d1/other -> {real / 'train' / 'dog' / 'd2'} (duplicate)",
            f"train/dog/d2/other -> {real / 'train' / 'dog' / 'd1'} (duplicate)",
            f"val/dog/again -> {real / 'val' / 'dog'} (loop)",
        ]
    )


@symlinks
def test_a_link_to_a_parent_folder_does_not_multiply_the_set(tmp_path: Path) -> None:
    make_folder(tmp_path, "train", ["cat", "dog"])
    make_folder(tmp_path, "val", ["cat", "dog"], n=2)
    (tmp_path / "train" / "cat" / "up").symlink_to("../../")  # the data root: train/ and val/
    data = build(tmp_path)
    assert (len(data.train), len(data.val)) == (6, 4)
    assert data.skipped_links == [f"train/cat/up -> {tmp_path.resolve()} (loop)"]


@symlinks
def test_links_out_of_the_split_are_skipped(tmp_path: Path) -> None:
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "data"
    png(elsewhere / "more" / "0.png")
    png(elsewhere / "x.png")
    make_folder(root, "train", ["cat", "dog"])
    make_folder(root, "val", ["cat", "dog"], n=2)
    train = root / "train"
    (train / "cat" / "more").symlink_to(elsewhere / "more")  # a folder elsewhere
    (train / "cat" / "x.png").symlink_to(elsewhere / "x.png")  # a file elsewhere
    (train / "dog" / "peek").symlink_to("../../val/dog")  # validation images into train/
    (train / "dog" / "v.png").symlink_to("../../val/dog/0.png")
    (train / "extra").symlink_to(elsewhere / "more")  # a class folder elsewhere: no class
    (root / "val" / "cat" / "t").symlink_to("../../train/cat")
    (train / "cat" / "notes.txt").symlink_to(elsewhere / "x.png")  # not an image name: ignored
    data = build(root)
    assert data.train.classes == ["cat", "dog"]
    assert per_class(data.train) == {"cat": 3, "dog": 3} and len(data.val) == 4
    real = tmp_path.resolve()
    assert sorted(data.skipped_links) == sorted(
        [
            f"train/cat/more -> {real / 'elsewhere' / 'more'} (points outside train/)",
            f"train/cat/x.png -> {real / 'elsewhere' / 'x.png'} (points outside train/)",
            f"train/dog/peek -> {real / 'data' / 'val' / 'dog'} (points outside train/)",
            f"train/dog/v.png -> {real / 'data' / 'val' / 'dog' / '0.png'} (points outside train/)",
            f"train/extra -> {real / 'elsewhere' / 'more'} (points outside train/)",
            f"val/cat/t -> {real / 'data' / 'train' / 'cat'} (points outside val/)",
        ]
    )


@symlinks
def test_links_inside_the_split_are_followed_once(tmp_path: Path) -> None:
    make_folder(tmp_path, "train", ["cat", "dog"])
    make_folder(tmp_path, "val", ["cat", "dog", "kitty"], n=1)
    train = tmp_path / "train"
    png(train / "dog" / "extra" / "e0.png")
    png(train / "dog" / "extra" / "e1.png")
    (train / "kitty").symlink_to("dog/extra")  # a class folder linking inside train/
    png(train / "cat" / "sub" / "s.png")
    (train / "cat" / "alias").symlink_to("sub")  # the class holds sub/ already
    (train / "cat" / "twice1").symlink_to("../dog/extra")
    (train / "cat" / "twice2").symlink_to("../dog/extra")  # the same folder again
    (train / "cat" / "best.png").symlink_to("../dog/0.png")  # a file link inside train/
    data = build(tmp_path)
    assert data.train.classes == ["cat", "dog", "kitty"]
    assert per_class(data.train) == {"cat": 3 + 1 + 2 + 1, "dog": 3 + 2, "kitty": 2}
    real = tmp_path.resolve() / "train"
    assert sorted(data.skipped_links) == [
        f"train/cat/alias -> {real / 'cat' / 'sub'} (duplicate)",
        f"train/cat/twice2 -> {real / 'dog' / 'extra'} (duplicate)",
    ]
    kitty = [path for path, label in data.train.samples if label == 2]
    assert kitty == [str(train / "kitty" / name) for name in ("e0.png", "e1.png")]
    assert str(train / "cat" / "twice1" / "e0.png") in [path for path, _ in data.train.samples]
    assert data.train[len(data.train) - 1][0].shape == (3, 32, 32)


@symlinks
def test_train_and_val_may_themselves_be_links(tmp_path: Path) -> None:
    fast, root = tmp_path / "fast", tmp_path / "data"
    make_folder(fast, "train", ["cat", "dog"])
    make_folder(fast, "val", ["cat", "dog"], n=2)
    (fast / "train" / "cat" / "more").symlink_to("../dog")  # inside the linked-to train/
    root.mkdir()
    (root / "train").symlink_to(fast / "train")
    (root / "val").symlink_to(fast / "val")
    data = build(root)
    assert per_class(data.train) == {"cat": 6, "dog": 3} and len(data.val) == 4
    assert data.skipped_links == []
    assert all(path.startswith(str(root / "train")) for path, _ in data.train.samples)


@symlinks
def test_train_and_val_must_be_separate_folders(tmp_path: Path) -> None:
    make_folder(tmp_path, "train", ["cat", "dog"])
    (tmp_path / "val").symlink_to("train")
    with pytest.raises(SparsekitError, match="separate folders"):
        build(tmp_path)


@symlinks
def test_dangling_links_are_listed(tmp_path: Path) -> None:
    make_folder(tmp_path, "train", ["cat", "dog"])
    make_folder(tmp_path, "val", ["cat", "dog"], n=2)
    train = tmp_path / "train"
    (train / "cat" / "gone.png").symlink_to("missing.png")
    (train / "cat" / "a.png").symlink_to("b.png")  # links that go round in a circle
    (train / "cat" / "b.png").symlink_to("a.png")
    (train / "dog" / "gone").symlink_to("../nothing")
    (train / "ghost").symlink_to("nowhere")  # a class folder that is not there
    data = build(tmp_path)
    assert data.train.classes == ["cat", "dog"] and len(data.train) == 6
    listed = sorted(link.split(" -> ")[0] for link in data.skipped_links)
    assert listed == ["train/cat/a.png", "train/cat/b.png", "train/cat/gone.png"] + [
        "train/dog/gone",
        "train/ghost",
    ]
    assert all(link.endswith(" (dangling)") for link in data.skipped_links)


def test_without_links_the_scan_matches_torchvision(tmp_path: Path) -> None:
    """Same classes, labels, extension filter and sample order as torchvision's ImageFolder."""
    from torchvision.datasets import ImageFolder

    names = ["x.PNG", "y.jpg", "notes.txt", "sub/z.png", "sub b/q.png", "sub-a/r.webp"]
    names += ["sub/deeper/s.jpeg", "a/b.tiff", "a b.png", "README"]
    for split in ("train", "val"):
        for cls in ("b_class", "a_class", ".hidden", "Zed"):
            for name in names:
                path = tmp_path / split / cls / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")
    data = build(tmp_path)
    reference = ImageFolder(str(tmp_path / "train"))
    assert data.train.classes == reference.classes
    assert data.train.class_to_idx == reference.class_to_idx
    assert data.train.samples == reference.samples and data.train.targets == reference.targets
    assert data.skipped_links == []


# --- class folders that differ ---------------------------------------------------------------
def test_a_class_mismatch_names_the_folders(tmp_path: Path) -> None:
    make_folder(tmp_path, "train", ["bird", "cats", "dogs"], n=1)
    make_folder(tmp_path, "val", ["bird", "catz"], n=1)
    with pytest.raises(SparsekitError) as err:
        build(tmp_path)
    message = str(err.value)
    assert "only in train/ (2): cats, dogs; only in val/ (1): catz." in message
    assert "same class folders" in message and "\n" not in message


def test_a_class_mismatch_lists_at_most_five(tmp_path: Path) -> None:
    make_folder(tmp_path, "train", ["a", "b", "c", "d", "e", "f", "g"], n=1)
    make_folder(tmp_path, "val", ["a", "b", "c", "d", "e", "f"], n=1)
    (tmp_path / "val" / "f").rename(tmp_path / "val" / "h")
    with pytest.raises(SparsekitError) as err:
        build(tmp_path)
    assert "only in train/ (2): f, g; only in val/ (1): h." in str(err.value)
    make_folder(tmp_path, "val", ["p", "q", "r", "s", "t", "u"], n=1)
    with pytest.raises(SparsekitError) as err:
        build(tmp_path)
    assert "only in val/ (7): h, p, q, r, s, ..." in str(err.value)


@symlinks
def test_a_mismatch_from_a_skipped_class_link_says_so(tmp_path: Path) -> None:
    png(tmp_path / "cats" / "0.png")
    make_folder(tmp_path / "data", "train", ["dog"], n=1)
    make_folder(tmp_path / "data", "val", ["cat", "dog"], n=1)
    (tmp_path / "data" / "train" / "cat").symlink_to(tmp_path / "cats")
    with pytest.raises(SparsekitError) as err:
        build(tmp_path / "data")
    message = str(err.value)
    assert "only in val/ (1): cat." in message
    assert f"train/cat -> {(tmp_path / 'cats').resolve()} (points outside train/)" in message


# --- unreadable images -------------------------------------------------------------------
def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _idat(data: bytes) -> bytes:
    at = data.index(b"IDAT")
    return data[at + 4 : at + 4 + struct.unpack(">I", data[at - 4 : at])[0]]


def _damaged_zlib() -> bytes:
    """Every chunk and checksum intact (Image.verify passes) but the pixels cannot decode."""
    good = _png_bytes()
    idat = _idat(good)
    ihdr = good[16 : 16 + 13]
    return good[:8] + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat[:2] + b"\xff" * 40)


def _garbage_chunk() -> bytes:
    """Pixel data split by a chunk of junk: Pillow raises SyntaxError while decoding."""
    good = _png_bytes()
    idat, half = _idat(good), len(_idat(good)) // 2
    junk = b"\x00\x00\x00\x04\xff\xde\x05\xc8junkjunk"
    head = good[:8] + _chunk(b"IHDR", good[16 : 16 + 13]) + _chunk(b"IDAT", idat[:half])
    return head + junk + _chunk(b"IDAT", idat[half:]) + _chunk(b"IEND", b"")


def _truncated_bmp() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, "BMP")
    return buffer.getvalue()[:100]


CORRUPT = {
    "truncated.png": lambda: _png_bytes()[:40],
    "random.jpg": lambda: random.Random(0).randbytes(600),
    "empty.png": lambda: b"",
    "garbage.png": lambda: _png_bytes()[:8] + random.Random(1).randbytes(200),
    "damaged.png": _damaged_zlib,
    "junkchunk.png": _garbage_chunk,
    "truncated.bmp": _truncated_bmp,
}
NEUTRAL = re.compile(
    r"cannot read the image .*broken-\S+ \(\w+: .*\)\. Remove or replace it, or pass "
    r"--bad-images skip to leave unreadable images out\.$"
)


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_a_corrupt_image_gets_the_neutral_message_or_is_skipped(tmp_path: Path, name) -> None:
    for split in ("train", "val"):
        png(tmp_path / split / "cat" / "fine.png")
    (tmp_path / "train" / "cat" / f"broken-{name}").write_bytes(CORRUPT[name]())
    data = build(tmp_path)
    with pytest.raises(SparsekitError) as err:
        [data.train[i] for i in range(len(data.train))]
    assert NEUTRAL.search(str(err.value)) and "--resume" not in str(err.value)
    assert isinstance(err.value, DataError)  # the trainer adds whether to --resume
    data = build(tmp_path, bad_images="skip")
    assert len(data.train) == 1 and [Path(p).name for p in data.skipped] == [f"broken-{name}"]
    assert data.train.targets == [0] and data.train[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(error, id=f"{type(error).__module__}.{type(error).__name__}")
        for error in (
            SyntaxError("broken PNG file"),
            struct.error("unpack requires a buffer of 4 bytes"),
            EOFError("no more images"),
            TypeError("bad header"),
            IndexError("index out of range"),
            KeyError("mode"),
            Image.DecompressionBombError("too many pixels"),
        )
    ],
)
def test_every_error_a_hostile_file_raises_is_caught(tmp_path: Path, monkeypatch, error) -> None:
    for split in ("train", "val"):
        png(tmp_path / split / "cat" / "0.png")
    data = build(tmp_path)

    def hostile(*args, **kwargs):
        raise error

    monkeypatch.setattr(Image, "open", hostile)
    with pytest.raises(SparsekitError, match="cannot read the image .*0.png"):
        data.train[0]
    with pytest.raises(SparsekitError, match="no readable images left in train/"):
        build(tmp_path, bad_images="skip")


def test_an_image_folder_survives_pickling_into_a_fresh_process(tmp_path: Path) -> None:
    """DataLoader workers started by spawn (the default on macOS) unpickle the data set in a new
    interpreter, where the ImageFolder subclass must be found by name."""
    import pickle
    import subprocess

    make_folder(tmp_path, "train", ["cat", "dog"], n=1)
    make_folder(tmp_path, "val", ["cat", "dog"], n=1)
    (tmp_path / "train.pkl").write_bytes(pickle.dumps(build(tmp_path).train))
    code = (
        "import pickle, sys; d = pickle.load(open(sys.argv[1], 'rb')); "
        "print(len(d), tuple(d[0][0].shape), d.skipped_links)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "train.pkl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "(3,", "32,", "32)", "[]"]


# --- the recipe's data section -------------------------------------------------------------
def _normalize(transform):
    from torchvision.transforms import Normalize

    return next(t for t in transform.transforms if isinstance(t, Normalize))


def test_folder_transforms_follow_the_models_own_config() -> None:
    """Unset values come from the model's pretrained config: ViT weights expect 0.5 and
    bicubic, DeiT's the ImageNet statistics; both a 0.9 centre crop."""
    from sparsekit.recipe.data import Data
    from sparsekit.train.transforms import folder_transforms

    _, val, vit = folder_transforms(Data(), "vit_tiny_patch16_224", 32)
    assert vit == {"interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                   "crop_pct": 0.9}  # fmt: skip
    assert _normalize(val).mean.tolist() == [0.5] * 3
    _, _, deit = folder_transforms(Data(), "deit_small_patch16_224", 32)
    assert deit["mean"] == pytest.approx((0.485, 0.456, 0.406))
    train, val, mine = folder_transforms(
        Data(mean=(0.1, 0.2, 0.3), std=(1, 1, 1), interpolation="bilinear", crop_pct=1.0),
        "vit_tiny_patch16_224",
        32,
    )
    assert mine == {"interpolation": "bilinear", "mean": (0.1, 0.2, 0.3), "std": (1, 1, 1),
                    "crop_pct": 1.0}  # fmt: skip
    assert _normalize(train).mean.tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_reference_augmentation_is_timms() -> None:
    """The reference's settings (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) build
    timm's own transforms, and a policy timm cannot read is a usage error naming it."""
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing

    from sparsekit.errors import UsageError
    from sparsekit.recipe.data import Data
    from sparsekit.train.transforms import folder_transforms

    data = Data(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, interpolation="random")
    train, val, _ = folder_transforms(data, "deit_small_patch16_224", 32)
    kinds = {type(t) for t in train.transforms}
    assert RandAugment in kinds and RandomErasing in kinds
    assert "bicubic" in repr(val)  # a random training interpolation evaluates bicubic
    with pytest.raises(UsageError, match="bogus-x1"):
        folder_transforms(Data(auto_augment="bogus-x1"), "deit_small_patch16_224", 32)


def test_image_folder_takes_the_given_transforms(tmp_path: Path) -> None:
    from sparsekit.recipe.data import Data
    from sparsekit.train.transforms import folder_transforms

    make_folder(tmp_path, "train", ["cat", "dog"])
    make_folder(tmp_path, "val", ["cat", "dog"], n=2)
    made = []

    def transforms(size: int):
        train, val, _ = folder_transforms(
            Data(mean=(0.0,) * 3, std=(1.0,) * 3), "vit_tiny_patch16_224", size
        )
        made.append(size)
        return train, val

    data = build_data(str(tmp_path), img_size=32, transforms=transforms)
    image, _ = data.val[0]
    assert made == [32] and image.min() >= 0 and image.max() <= 1  # mean 0, std 1: [0, 1]
