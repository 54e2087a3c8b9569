"""folder: a user's own images in <root>/{train,test}/<class>/, resized once and cached."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import ConfigError, DatasetError
from .base import Dataset, cached_dataset, class_dirs, open_image, to_rgb


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _image_files(folder: Path) -> list[Path]:
    return sorted(Path(e.path) for e in os.scandir(folder)
                  if e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


def _folder_listing(base: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Classes (sorted train folders) and each split's (file, label) pairs, checked against the layout."""
    layout = (f"{base}/train/<class>/<images> and {base}/test/<class>/<images> ({', '.join(IMAGE_EXTENSIONS)}); "
              "every test class folder also in train")
    for s in ("train", "test"):
        if not (base / s).is_dir():
            raise DatasetError(f"Image folder dataset not found: looked for {base / s}. Expected layout: {layout}. "
                               "To obtain it: put your images there, or point options.root (relative to data_dir, "
                               "or absolute) at the folder that holds train/ and test/; download: true cannot fetch them.")
    # Hidden folders (.ipynb_checkpoints, ...) are not classes.
    dirs = {s: [c for c in class_dirs(base / s) if not c.startswith(".")] for s in ("train", "test")}
    classes = dirs["train"]
    if not classes:
        raise DatasetError(f"{base / 'train'}: no class folders. Expected layout: {layout}")
    extra = sorted(set(dirs["test"]) - set(classes))
    if extra:
        raise DatasetError(f"{base / 'test'}: class folder(s) {extra} have no counterpart in {base / 'train'} "
                           f"(classes {classes}). Expected layout: {layout}")
    items = {}
    for s in ("train", "test"):
        items[s] = []
        for c in dirs[s]:
            files = _image_files(base / s / c)
            if not files and s == "train":
                raise DatasetError(f"{base / s / c}: no images ({', '.join(IMAGE_EXTENSIONS)}). Expected layout: {layout}")
            items[s] += [(f, classes.index(c)) for f in files]
    if not items["test"]:
        raise DatasetError(f"{base / 'test'}: no images. Expected layout: {layout}")
    return classes, items


def _folder_base(data_dir: Path, root) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise ConfigError("options.root", root, "a folder (relative to data_dir, or absolute); '' for data_dir itself")
    return Path(data_dir) / root


class _ImageFiles:
    """(RGB PIL image, label) per file, the torchvision-style dataset cached_dataset's build() returns."""

    def __init__(self, items: list[tuple[Path, int]], expect: tuple[int, int] | None):
        self.items, self.expect = items, expect

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        with open_image(path) as im:
            if self.expect is not None and im.size != self.expect:
                raise ConfigError("image_size", None, f"an integer: images under {path.parents[2]} vary in size "
                                  f"({path} is {im.size[0]}x{im.size[1]}, others {self.expect[0]}x{self.expect[1]})")
            return to_rgb(im), label


def load(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path, *, root: str = "") -> Dataset:
    """A user's own images in <data_dir>/<root>/{train,test}/<class>/; classes are the sorted train
    folders. Resized to image_size (shorter side, centre crop) and cached; without image_size all
    images must share one square size, which is kept."""
    base = _folder_base(data_dir, root)
    classes, items = _folder_listing(base)
    expect = None
    size = image_size
    if size is None:
        first = items["train"][0][0]
        with open_image(first) as im:
            expect = im.size
        if expect[0] != expect[1]:
            raise ConfigError("image_size", None, f"an integer for the folder loader: {first} is {expect[0]}x{expect[1]}, "
                              "not square")
        size = expect[0]
    # The file list (names, sizes, times) is part of the cache name, so adding or editing images rebuilds it.
    h = hashlib.sha256(str(base.resolve()).encode())
    for s in ("train", "test"):
        for f, y in items[s]:
            st = f.stat()
            h.update(f"{s}\0{f.relative_to(base)}\0{y}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return cached_dataset("folder", h.hexdigest()[:16], size, cache_dir, base,
                          lambda: ({s: _ImageFiles(items[s], expect) for s in ("train", "test")}, classes))


def locate(data_dir: Path, *, root: str = "") -> None:
    """Refuse, saying what is missing, unless the train/ and test/ class folders hold images."""
    _folder_listing(_folder_base(data_dir, root))


def train_size(data_dir: Path, *, root: str = "") -> int | None:
    base = _folder_base(data_dir, root)
    if not (base / "train").is_dir():
        return None
    return sum(len(_image_files(base / "train" / c)) for c in class_dirs(base / "train") if not c.startswith("."))
