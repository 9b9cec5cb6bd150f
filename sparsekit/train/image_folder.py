"""An ImageFolder root (`train/CLASS/IMAGE`, `val/CLASS/IMAGE`) read the way torchvision reads it,
but safe against what real folders hold: symbolic links that loop, lead out of their split or
repeat a folder, and image files that cannot be decoded."""

from __future__ import annotations

import functools
import os
import stat
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sparsekit.errors import DataError, SparsekitError
from sparsekit.train.data_bundle import DataBundle


def image_folder(
    root: Path,
    img_size: int,
    bad_images: str = "refuse",
    transforms: tuple[Callable, Callable] | None = None,
) -> DataBundle:
    """The ImageFolder splits of `root`, through `transforms` (train, eval; default: timm's
    defaults at `img_size`; the trainer passes `train.transforms.folder_transforms`)."""
    from timm.data import create_transform

    missing = [part for part in ("train", "val") if not (root / part).is_dir()]
    if missing:
        raise SparsekitError(
            f"--data {root}: expected an ImageFolder root with train/ and val/ folders (ImageNet "
            f"layout: train/CLASS/IMAGE.jpg), but {' and '.join(missing)} is missing. Use "
            "--data digits or --data synthetic for the built-in sets."
        )
    real_train, real_val = (os.path.realpath(root / part) for part in ("train", "val"))
    if _within(real_train, real_val) or _within(real_val, real_train):
        raise SparsekitError(
            f"--data {root}: train/ ({real_train}) and val/ ({real_val}) are the same folder or "
            "one lies inside the other, so the model would be validated on images it trained "
            "on. Point train/ and val/ at separate folders."
        )
    folder = _folder_class()
    try:
        train_tf, val_tf = transforms or (
            create_transform(img_size, is_training=True),
            create_transform(img_size, is_training=False),
        )
        train = folder(str(root / "train"), "train", train_tf)
        val = folder(str(root / "val"), "val", val_tf)
    except (FileNotFoundError, OSError) as err:
        raise SparsekitError(f"--data {root}: {err}") from None
    links = train.skipped_links + val.skipped_links
    if train.classes != val.classes:
        raise SparsekitError(_class_mismatch(root, train.classes, val.classes, links))
    skipped = _drop_unreadable(train) + _drop_unreadable(val) if bad_images == "skip" else []
    if not len(train) or not len(val):
        raise SparsekitError(
            f"--data {root}: no readable images left in {'train/' if not len(train) else 'val/'} "
            f"({len(skipped)} unreadable skipped)."
        )
    return DataBundle(
        str(root),
        train,
        val,
        len(train.classes),
        3,
        img_size,
        patch_size=None,
        skipped=skipped,
        skipped_links=links,
    )


def class_folders(split: Path) -> list[str]:
    """The class folders of one split folder, sorted, as the data set reads them (links under
    the same rules), without walking them for images.

    Raises:
        FileNotFoundError: no class folders.
    """
    return _SplitScan(os.fspath(split), split.name, []).classes()


def _some(names: list[str], limit: int = 5) -> str:
    """A list for a message: the first `limit` names, then '...'."""
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _links_note(links: list[str]) -> str:
    """Links left out can be why a class is missing or empty, so errors mention them."""
    if not links:
        return ""
    which = f"{len(links)} symbolic links were not followed, e.g." if len(links) > 1 else ""
    return (
        f" Note: {which or '1 symbolic link was not followed:'} {links[0]}; a link is followed "
        "only when its target lies inside its own split folder (to keep images on another "
        "disk, make train/ or val/ itself the link)."
    )


def _class_mismatch(root: Path, train: list[str], val: list[str], links: list[str]) -> str:
    """Name the class folders that differ: a label is a class's position in sorted order, so
    one extra or misspelt folder silently shifts every label after it."""
    parts = []
    for split, ours, theirs in (("train", train, val), ("val", val, train)):
        only = sorted(set(ours) - set(theirs))
        if only:
            parts.append(f"only in {split}/ ({len(only)}): {_some(only)}")
    return (
        f"--data {root}: the class folders of train/ and val/ differ: {'; '.join(parts)}. Both "
        "must hold the same class folders (a label is a class's position in sorted order); "
        "rename, add or remove folders so that the two lists match." + _links_note(links)
    )


def _within(path: str, folder: str) -> bool:
    """Whether the resolved `path` is the resolved `folder` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _entries(path: str) -> list[os.DirEntry]:
    """A folder's entries by name (a fixed order whatever the file system's), or none if the
    folder cannot be listed, which os.walk (and so torchvision) also passes over in silence."""
    try:
        with os.scandir(path) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError:
        return []


class _SplitScan:
    """One split folder (train/ or val/) scanned like torchvision's ImageFolder (same class
    order, same extension filter, same sample order), but with symbolic links under control.

    ImageFolder walks with os.walk(followlinks=True): a link loop never finishes and a link to a
    parent folder counts the data set again. Here a link, to a folder or a file, is followed only
    when its target lies inside the split's resolved folder (a link out of the split would bring
    in other images, or validation images into train/). A folder link is followed at most once
    per class and never to a folder above it (a loop); real folders are walked before any link,
    so a link to a folder the class already holds is the one left out. Each link left out is
    recorded in `skipped` as "train/cat/up -> /resolved/target (reason)". The walk terminates on
    any link structure: each folder (by device and inode) is listed at most once per class.
    """

    def __init__(self, top: str, split: str, skipped: list[str]):
        self.top, self.split, self.skipped = top, split, skipped
        self.real_top = os.path.realpath(top)
        self.outside = f"points outside {split}/"

    def skip(self, link: str, why: str) -> None:
        where = os.path.relpath(link, self.top)
        self.skipped.append(f"{self.split}/{where} -> {os.path.realpath(link)} ({why})")

    def link_kind(self, link: str) -> str | None:
        """'dir' or 'file' for what a link leads to; None (recorded) if it leads nowhere."""
        try:
            mode = os.stat(link).st_mode
        except OSError:  # the target is missing, or the links go round in a circle
            self.skip(link, "dangling")
            return None
        return "dir" if stat.S_ISDIR(mode) else "file"

    def folder_link(
        self, link: str, chain: tuple[str, ...], seen: set[tuple[int, int]] | None
    ) -> str | None:
        """The resolved folder a folder link may be followed to, or None (recorded) if not.

        `chain` holds the resolved folders from the class folder down to the link's own."""
        target = os.path.realpath(link)
        if any(_within(folder, target) for folder in chain):
            why = "loop"
        elif not _within(target, self.real_top):
            why = self.outside
        elif seen is not None and _identity(target) in seen:
            why = "duplicate"
        else:
            return target
        self.skip(link, why)
        return None

    def classes(self) -> list[str]:
        """The class folders, sorted by name; a class folder that is a link obeys the link rule."""
        names = []
        for entry in _entries(self.top):
            if entry.is_symlink():
                if self.link_kind(entry.path) == "dir" and self.folder_link(
                    entry.path, (self.real_top,), None
                ):
                    names.append(entry.name)
            elif entry.is_dir(follow_symlinks=False):
                names.append(entry.name)
        if not names:
            raise FileNotFoundError(
                f"{self.split}/ holds no class folders (expected {self.split}/CLASS/IMAGE)."
                + _links_note(self.skipped)
            )
        return sorted(names)

    def samples(
        self,
        class_to_idx: dict[str, int],
        is_valid_file: Callable[[str], bool],
        allow_empty: bool,
        extensions: tuple[str, ...] | None,
    ) -> list[tuple[str, int]]:
        """(path, label) for every image, in torchvision's order."""
        instances, empty = [], []
        for name in sorted(class_to_idx):
            top = os.path.join(self.top, name)
            if not os.path.isdir(top):
                continue
            paths = self.class_images(top, is_valid_file)
            instances += [(path, class_to_idx[name]) for path in paths]
            if not paths:
                empty.append(name)
        if empty and not allow_empty:
            kinds = f" (files ending in {', '.join(extensions)})" if extensions else ""
            raise FileNotFoundError(
                f"{self.split}/ has class folders without any image{kinds}: {_some(empty)}. Add "
                "images to them or remove them from both train/ and val/."
                + _links_note(self.skipped)
            )
        return instances

    def class_images(self, top: str, is_valid_file: Callable[[str], bool]) -> list[str]:
        """One class's image paths: folders sorted by path, then files by name (as torchvision's
        sorted(os.walk(...)) gives them); paths run through the links as the user laid them out."""
        seen: set[tuple[int, int]] = set()
        folders: list[tuple[str, list[str]]] = []
        links: deque[tuple[str, tuple[str, ...]]] = deque()

        def walk(path: str, real: str, chain: tuple[str, ...]) -> None:
            """The real folders under `path` (resolved: `real`); folder links are queued."""
            stack = [(path, real, chain)]
            while stack:
                path, real, chain = stack.pop()
                try:
                    key = _identity(real)
                except OSError:
                    continue
                if key in seen:  # reached before, through a link
                    continue
                seen.add(key)
                files = []
                for entry in _entries(path):
                    if entry.is_symlink():
                        kind = self.link_kind(entry.path)
                        if kind == "dir":
                            links.append((entry.path, chain))
                        elif kind == "file" and is_valid_file(entry.path):
                            if _within(os.path.realpath(entry.path), self.real_top):
                                files.append(entry.name)
                            else:
                                self.skip(entry.path, self.outside)
                    elif entry.is_dir(follow_symlinks=False):
                        sub = os.path.join(real, entry.name)
                        stack.append((entry.path, sub, (*chain, sub)))
                    elif is_valid_file(entry.path):
                        files.append(entry.name)
                folders.append((path, files))

        real = os.path.realpath(top)
        walk(top, real, (real,))
        while links:
            link, chain = links.popleft()
            target = self.folder_link(link, chain, seen)
            if target is not None:
                walk(link, target, (*chain, target))
        return [
            os.path.join(path, name) for path, files in sorted(folders) for name in sorted(files)
        ]


def _identity(path: str) -> tuple[int, int]:
    """A folder's (device, inode): the same folder however it is reached, bind mounts included."""
    info = os.stat(path)
    return info.st_dev, info.st_ino


_IMAGE_FOLDER: type | None = None


def _folder_class() -> type:
    """torchvision's ImageFolder, scanned by `_SplitScan`: same classes, labels and sample order
    on a tree without links; links obey the rules there. Its list of links left out is
    `skipped_links`.

    Built on first use so that importing this module does not import torchvision (about 1 s);
    the module's `__getattr__` hands it out by name so that DataLoader workers started by spawn
    can unpickle it.
    """
    global _IMAGE_FOLDER
    if _IMAGE_FOLDER is None:
        from torchvision.datasets import ImageFolder
        from torchvision.datasets.folder import has_file_allowed_extension

        class ScannedImageFolder(ImageFolder):
            def __init__(self, root: str, split: str, transform=None, loader=_open_image):
                self.split, self.skipped_links = split, []
                super().__init__(root, transform, loader=loader)

            def find_classes(self, directory):
                scan = _SplitScan(os.fspath(directory), self.split, self.skipped_links)
                classes = scan.classes()
                return classes, {name: i for i, name in enumerate(classes)}

            def make_dataset(
                self,
                directory,
                class_to_idx,
                extensions=None,
                is_valid_file=None,
                allow_empty=False,
            ):
                if (extensions is None) == (is_valid_file is None):
                    raise ValueError("pass exactly one of extensions and is_valid_file")
                if extensions is not None:

                    def is_valid_file(path: str) -> bool:
                        return has_file_allowed_extension(path, extensions)

                scan = _SplitScan(os.fspath(directory), self.split, self.skipped_links)
                return scan.samples(class_to_idx, is_valid_file, allow_empty, extensions)

        ScannedImageFolder.__module__ = __name__
        ScannedImageFolder.__qualname__ = ScannedImageFolder.__name__
        _IMAGE_FOLDER = ScannedImageFolder
    return _IMAGE_FOLDER


def __getattr__(name: str):
    if name == "ScannedImageFolder":
        return _folder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _unreadable_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged or hostile image file can raise: OSError (a missing file,
    truncation, Image.UnidentifiedImageError); SyntaxError, struct.error, IndexError, TypeError
    and KeyError, which Pillow's format plugins raise on corrupt headers and chunks (Image.open
    catches most of them while it identifies a file, verify() and load() let them through);
    EOFError and ValueError from short or malformed data; DecompressionBombError for sizes past
    Image.MAX_IMAGE_PIXELS."""
    from PIL import Image

    return (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        TypeError,
        IndexError,
        KeyError,
        struct.error,
        Image.DecompressionBombError,
    )


def _read_rgb(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def _readable(paths: list[str]) -> list[bool]:
    out = []
    for path in paths:
        try:
            _read_rgb(path)
            out.append(True)
        except _unreadable_errors():
            out.append(False)
    return out


def _drop_unreadable(folder) -> list[str]:
    """Leave out the images the loader cannot read, found by decoding each once, up front: a
    header check (Image.verify) passes files that fail to decode later (a truncated BMP, a PNG
    whose compressed data is damaged), which would stop the run mid-epoch. Decoding runs on
    threads, since Pillow releases the GIL while it decodes."""
    paths = [path for path, _ in folder.samples]
    chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with ThreadPoolExecutor(max_workers=max(1, min(32, cores or 1))) as pool:
        readable = [ok for chunk in pool.map(_readable, chunks) for ok in chunk]
    kept = [sample for sample, ok in zip(folder.samples, readable, strict=True) if ok]
    folder.samples = folder.imgs = kept
    folder.targets = [label for _, label in kept]
    return [path for path, ok in zip(paths, readable, strict=True) if not ok]


def _open_image(path: str):
    """An RGB image, or an error naming the file that cannot be read (rather than a PIL
    traceback from inside the data loader). It gives no advice on --resume: the trainer, which
    knows whether a checkpoint exists yet, adds that to a DataError."""
    try:
        return _read_rgb(path)
    except _unreadable_errors() as err:
        raise DataError(
            f"cannot read the image {path} ({type(err).__name__}: {err}). Remove or replace it, "
            "or pass --bad-images skip to leave unreadable images out."
        ) from None
