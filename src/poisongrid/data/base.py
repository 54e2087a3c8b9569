"""What every loader shares: Split and Dataset, option checks, missing-data errors, the resize
recipe, and the decode-once cache of the variable-size sets (see the package docstring)."""
from __future__ import annotations

import inspect
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import ConfigError, DatasetError
from ..io import atomic_path

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, 3, H, W)
    labels: np.ndarray  # int64 (N,)


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


def check_options(name: str, fn: Callable, options: dict) -> None:
    allowed = sorted(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY)
    for k, v in options.items():
        if k not in allowed:
            raise ConfigError(f"options.{k}", v, f"only the options {allowed} for dataset loader '{name}'")


def option_path(data_dir: Path, path) -> Path:
    """An option's path: absolute as given, relative to data_dir otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError("options.path", path, "a path (relative to data_dir, or absolute)")
    return Path(data_dir) / path


def pil_image():
    """PIL.Image, imported on first use: loading digits, CIFAR-10 at 32 px or a cache needs no PIL."""
    from PIL import Image

    return Image


def missing_error(what: str, path: Path | str, layout: str, how: str) -> DatasetError:
    return DatasetError(
        f"{what} not found: looked for {path}. Expected layout: {layout}. To obtain it: set download: true "
        f"where the internet is reachable, or {how}."
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode PIL reads as 8-bit RGB, its values scaled rather than clipped: 16-bit grey (I;16*,
    or I holding 16-bit values) by 255/65535, float grey (F) from [0, 1] (or [0, 255]), other
    integer or float ranges stretched from their minimum to their maximum; palettes, alpha (dropped),
    CMYK and the other colour modes through PIL's own conversion."""
    Image = pil_image()
    if img.mode in ("RGB",):
        return img
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535 and hi > 255):
            scaled = a * (255.0 / 65535.0)
        elif lo >= 0 and hi <= (1.0 if img.mode == "F" else 255):
            scaled = a * (255.0 if img.mode == "F" else 1.0)
        elif hi > lo:
            scaled = (a - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.zeros_like(a)
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")


def open_image(path: Path) -> Image.Image:
    """An image file opened for decoding, refused by name where it is unreadable or a decompression
    bomb (more pixels than PIL's safety limit)."""
    import warnings

    Image = pil_image()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
        return im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DatasetError(f"{path}: refused: more than {Image.MAX_IMAGE_PIXELS:,} pixels, PIL's limit for one image "
                           "(a decompression bomb?)") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for an unreadable image
        raise DatasetError(f"{path}: not a readable image ({e})") from None


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side -> size (PIL bilinear), centre-crop size x size, RGB; returns uint8 (3, size, size)."""
    img = to_rgb(img)
    w, h = img.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), pil_image().BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def decode_into(ds, out: np.ndarray, labels: np.ndarray, size: int, chunk: int = 1024) -> None:
    """Decode + resize ds[i] (a (PIL image, label) pair) into out[i]; threads, since PIL releases the GIL."""
    def one(i):
        img, y = ds[i]
        return resize_square(img, size), y

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        for start in range(0, len(ds), chunk):  # chunked so ImageNet never queues a million futures
            idx = range(start, min(start + chunk, len(ds)))
            for i, (arr, y) in zip(idx, ex.map(one, idx)):
                out[i], labels[i] = arr, y


def cached_dataset(name: str, tag: str, size: int, cache_dir: Path, source: Path,
                   build: Callable[[], tuple[dict, list[str]]]) -> Dataset:
    """Load the resized arrays from cache_dir, or build() and write them there first.

    build() returns ({split: torchvision-style dataset}, classes). The image size is part of every
    file name, so a cache made at one size is never used for another; the meta file is written
    last, so a cache interrupted mid-write is simply rebuilt.
    """
    stem = f"{name}{'-' + tag if tag else ''}-{size}px"
    meta_path = cache_dir / f"{stem}-meta.json"
    files = {s: (cache_dir / f"{stem}-{s}-images.npy", cache_dir / f"{stem}-{s}-labels.npy") for s in ("train", "test")}
    meta = _read_meta(meta_path, files, source, size)
    if meta is None:
        splits, classes = build()
        for s, ds in splits.items():
            img_path, lab_path = files[s]
            labels = np.empty(len(ds), np.int64)
            with atomic_path(img_path) as tmp:
                # Written through a memmap so the full array never has to sit in RAM.
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(ds), 3, size, size))
                decode_into(ds, out, labels, size)
                out.flush()
                del out
            with atomic_path(lab_path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, labels)
        meta = {"classes": classes, "source": str(source.resolve()), "image_size": size}
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
    split = {s: Split(np.load(i, mmap_mode="r"), np.load(lab).astype(np.int64)) for s, (i, lab) in files.items()}
    return Dataset(name, split["train"], split["test"], list(meta["classes"]))


def _read_meta(meta_path: Path, files: dict, source: Path, size: int) -> dict | None:
    """The cache's meta if the cache is complete and was made from `source` at `size`, else None."""
    if not meta_path.exists() or not all(p.exists() for pair in files.values() for p in pair):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    if meta.get("source") != str(source.resolve()) or meta.get("image_size") != size:
        return None  # same cache_dir shared by another data root: rebuild rather than mix them
    return meta


def via_torchvision(make: Callable, err: DatasetError):
    """Construct a torchvision dataset, turning its 'Dataset not found' (and I/O) errors into `err`."""
    try:
        return make()
    except (RuntimeError, OSError) as e:
        raise DatasetError(f"{err} (torchvision said: {e})") from None


def class_dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())
