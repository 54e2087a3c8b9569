"""npz: arrays a user saved with np.savez, read without pickle."""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DatasetError
from .base import Dataset, Split, option_path, pil_image, resize_square


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_file(data_dir: Path, path) -> Path:
    if path is None:
        raise ConfigError("options.path", None, "the .npz file to load (relative to data_dir, or absolute)")
    return option_path(data_dir, path)


def _npz_missing(file: Path) -> DatasetError:
    return DatasetError(f"npz dataset not found: looked for {file}. Expected layout: one .npz holding {', '.join(_NPZ_KEYS)} "
                        "(uint8 images N x H x W, N x H x W x C or N x C x H x W with C 1 or 3; integer labels) and "
                        "optionally classes. To obtain it: write it with np.savez(path, x_train=..., y_train=..., "
                        "x_test=..., y_test=...) and set options.path; download: true cannot fetch it.")


def npz_images(file: Path, key: str, x: np.ndarray) -> np.ndarray:
    """uint8 (N, 3, H, W) from N x H x W, N x H x W x C or N x C x H x W (C in {1, 3}; channels-last
    wins when both readings fit, as in images of width 1 or 3)."""
    if x.dtype != np.uint8:
        raise DatasetError(f"{file}: {key} has dtype {x.dtype}; expected uint8 images (0..255)")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise DatasetError(f"{file}: {key} has shape {x.shape}; expected N x H x W, N x H x W x C or N x C x H x W "
                           "with C 1 or 3")
    if len(x) == 0:
        raise DatasetError(f"{file}: {key} holds no images")
    return np.ascontiguousarray(np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x)


def load(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path, *, path: str | None = None) -> Dataset:
    """Arrays from one .npz (`path`, relative to data_dir or absolute): x_train, y_train, x_test,
    y_test and optional classes (strings; default "0".."k-1"). Read with allow_pickle=False, so a
    file can never run code. Resized to image_size (shorter side, centre crop) in memory if given."""
    file = _npz_file(data_dir, path)
    if not file.is_file():
        raise _npz_missing(file)
    arrays = {}
    try:
        z = np.load(file, allow_pickle=False)
        if isinstance(z, np.ndarray):
            raise DatasetError(f"{file}: a single .npy array, expected an .npz archive with {', '.join(_NPZ_KEYS)}")
        with z:
            missing = [k for k in _NPZ_KEYS if k not in z.files]
            if missing:
                raise DatasetError(f"{file}: missing array(s) {missing}; it holds {sorted(z.files)}, expected "
                                   f"{', '.join(_NPZ_KEYS)} and optionally classes")
            for k in _NPZ_KEYS + (("classes",) if "classes" in z.files else ()):
                try:
                    arrays[k] = z[k]
                except ValueError as e:  # object arrays need pickle
                    raise DatasetError(f"{file}: array {k} cannot be read without pickle ({e}); save it as a "
                                       "plain numeric (or, for classes, string) array") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DatasetError(f"{file}: not a readable .npz ({e})") from None
    x = {s: npz_images(file, f"x_{s}", arrays[f"x_{s}"]) for s in ("train", "test")}
    y = {}
    for s in ("train", "test"):
        lab = arrays[f"y_{s}"]
        if not np.issubdtype(lab.dtype, np.integer) or lab.ndim != 1 or len(lab) != len(x[s]):
            raise DatasetError(f"{file}: y_{s} has dtype {lab.dtype} and shape {lab.shape}; expected integer labels of "
                               f"shape ({len(x[s])},), one per image of x_{s}")
        y[s] = lab.astype(np.int64)
    if "classes" in arrays:
        c = arrays["classes"]
        if c.ndim != 1 or c.dtype.kind not in "US" or len(c) == 0:
            raise DatasetError(f"{file}: classes has dtype {c.dtype} and shape {c.shape}; expected a non-empty 1-D string array")
        classes = [v.decode() if isinstance(v, bytes) else str(v) for v in c.tolist()]
    else:
        classes = [str(i) for i in range(int(max(y["train"].max(), y["test"].max())) + 1)]
    for s in ("train", "test"):
        bad = (y[s] < 0) | (y[s] >= len(classes))
        if bad.any():
            raise DatasetError(f"{file}: y_{s} holds label {int(y[s][bad][0])} outside 0..{len(classes) - 1} "
                               f"({'the classes array' if 'classes' in arrays else 'labels must be non-negative'})")
    shapes = {x[s].shape[2:] for s in ("train", "test")}
    if image_size is None:
        if len(shapes) > 1 or x["train"].shape[2] != x["train"].shape[3]:
            raise ConfigError("image_size", None, f"an integer: {file} holds images of size(s) {sorted(shapes)} "
                              "(H x W), and datasets are square images of one size")
    else:
        for s in ("train", "test"):
            if x[s].shape[2:] != (image_size, image_size):
                x[s] = np.stack([resize_square(pil_image().fromarray(im.transpose(1, 2, 0)), image_size) for im in x[s]])
    return Dataset("npz", Split(x["train"], y["train"]), Split(x["test"], y["test"]), classes)


def locate(data_dir: Path, *, path: str | None = None) -> None:
    """Refuse, saying where the file belongs, unless it is where load reads it."""
    file = _npz_file(data_dir, path)
    if not file.is_file():
        raise _npz_missing(file)


def train_size(data_dir: Path, *, path: str | None = None) -> int | None:
    file = _npz_file(data_dir, path)
    if not file.is_file():
        return None
    try:
        with zipfile.ZipFile(file) as zf:
            if "x_train.npy" not in zf.namelist():
                raise DatasetError(f"{file}: missing array x_train; it holds {sorted(n[:-4] for n in zf.namelist())}")
            with zf.open("x_train.npy") as fh:  # only the header is read (and decompressed)
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape = read(fh)[0]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DatasetError(f"{file}: not a readable .npz ({e})") from None
    return int(shape[0]) if shape else 0
