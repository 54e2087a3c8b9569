"""digits: scikit-learn's 8x8 digits, upscaled by nearest neighbour and cached."""
from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..io import atomic_path
from .base import Dataset, Split


_DIGITS_N = 1797  # images in sklearn's digits


def _check_digits_options(test_fraction, split_seed) -> None:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError("options.test_fraction", test_fraction, "a number strictly between 0 and 1")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ConfigError("options.split_seed", split_seed, "a non-negative integer")


def load(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path, *,
         test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (ships with sklearn), values 0..16 -> round(v*255/16), upscaled by
    NEAREST-NEIGHBOUR to image_size (default 32), replicated to 3 channels. The stratified split
    depends only on test_fraction and split_seed (not the experiment seed), so it is bit-reproducible.

    The arrays are cached in cache_dir (a few MB) after the first load: importing scikit-learn
    takes about a second, ten times what reading them back does, and the light jobs (poison) load
    digits once per cell. An unwritable cache_dir only means no cache."""
    _check_digits_options(test_fraction, split_seed)
    size = image_size or 32
    cache = cache_dir / f"digits-{size}px-test{float(test_fraction)!r}-split{split_seed}.npz"
    try:
        with np.load(cache, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _DIGITS_ARRAYS}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):  # absent or unreadable: rebuild it
        arrays = _digits_arrays(size, test_fraction, split_seed)
        try:
            with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        except OSError:
            pass
    return Dataset("digits", Split(arrays["x_train"], arrays["y_train"]), Split(arrays["x_test"], arrays["y_test"]),
                   [str(i) for i in range(10)])


_DIGITS_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _digits_arrays(size: int, test_fraction: float, split_seed: int) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    src = (np.arange(size) * 8) // size  # nearest source row/column for each output pixel
    x = x[:, src][:, :, src]
    x = np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))
    y = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=split_seed, stratify=y)
    tr, te = np.sort(tr), np.sort(te)
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


def train_size(data_dir: Path, *, test_fraction: float = 0.2, split_seed: int = 0) -> int:
    _check_digits_options(test_fraction, split_seed)
    return _DIGITS_N - math.ceil(test_fraction * _DIGITS_N)  # sklearn's train_test_split rounds the test part up
