"""Datasets as uint8 NCHW arrays: one loader per name, registered in DATASETS.

Every loader returns RGB images (C == 3; grayscale is replicated) as uint8 (N, 3, H, W) and
int64 labels, in a deterministic order (sorted files or the dataset's own file order).

Variable-size sets (gtsrb, imagenette, imagenet, folder) are resized ONCE at load: the shorter side is
scaled to `image_size` with PIL bilinear, then the centre `image_size` x `image_size` square is
cropped. The result is cached as .npy files under `cache_dir` (default `<data_dir>/.poisongrid-cache`)
and later loads memory-map it read-only, because decoding thousands of JPEGs is slow and ImageNet
at 224 px (~190 GB) does not fit in RAM. Copy a split's images before writing into them.

train_size() gives a loader's training-set size from metadata alone, so a config's poisoning
budgets can be checked without decoding any image.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, DatasetError
from ..registry import Registry
from . import cifar10, digits, fashion_mnist, folder, gtsrb, imagenet, imagenette, npz
from .base import Dataset, Split, check_options, resize_square
from .cifar10 import CIFAR_MD5
from .fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_SYSTEM_DIR
from .folder import IMAGE_EXTENSIONS
from .npz import npz_images

# Re-exported for callers. The loaders read these names in their own modules, so a test that
# patches one (FASHION_MNIST_SYSTEM_DIR, CIFAR_MD5) must patch it there, not here.
__all__ = ["CIFAR_MD5", "DATASETS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_SYSTEM_DIR", "IMAGE_EXTENSIONS", "Dataset",
           "Split", "check_present", "load_dataset", "npz_images", "resize_square", "train_size"]

# Each loader is called as loader(data_dir: Path, image_size: int | None, download: bool,
# cache_dir: Path, **options); its keyword-only parameters are the options it accepts.
DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset", "poisongrid.datasets")

# name -> the module holding its load() and train_size(): adding a dataset is one module and one
# entry here. The modules import torch, torchvision, PIL and sklearn only inside functions, so
# importing them all keeps `import poisongrid.data` cheap for the light jobs.
_LOADERS = {
    "cifar10": cifar10,
    "digits": digits,
    "fashion_mnist": fashion_mnist,
    "folder": folder,
    "gtsrb": gtsrb,
    "imagenet": imagenet,
    "imagenette": imagenette,
    "npz": npz,
}
for _name, _module in _LOADERS.items():
    DATASETS.register(_name)(_module.load)
del _name, _module

# Training-set size from metadata, called as size(data_dir: Path, **options) with the loader's options.
_TRAIN_SIZES: dict[str, Callable[..., int | None]] = {name: module.train_size for name, module in _LOADERS.items()}


def check_present(loader: str, data_dir: str | os.PathLike, options: dict, cache_dir: str | os.PathLike | None = None) -> None:
    """Refuse (DatasetError naming where the data belongs) unless `loader` finds its data under
    data_dir, or a cache made from it (the resized arrays) is in cache_dir; reads no image."""
    fn = DATASETS.get(loader, "loader")
    check_options(loader, fn, options)
    locate = getattr(_LOADERS[loader], "locate", None) if loader in _LOADERS else None
    if locate is None:
        return
    try:
        locate(Path(data_dir), **options)
    except DatasetError:
        cache = Path(cache_dir) if cache_dir is not None else Path(data_dir) / ".poisongrid-cache"
        if not any(cache.glob(f"{loader}-*meta.json")):
            raise


def load_dataset(name: str, *, data_dir: str | os.PathLike = "data", image_size: int | None = None,
                 download: bool = False, cache_dir: str | os.PathLike | None = None, **options) -> Dataset:
    """Load dataset `name`; unknown names, options or bad option values raise ConfigError."""
    loader = DATASETS.get(name, "dataset")
    check_options(name, loader, options)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError("image_size", image_size, "a positive integer or null")
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir / ".poisongrid-cache"
    return loader(data_dir, image_size, download, cache_dir, **options)


def train_size(loader: str, data_dir: str | os.PathLike, options: dict) -> int | None:
    """Number of training examples of `loader` with `options`, from metadata only (no image is
    decoded): fixed sizes for the standard sets, headers or file counts for the others. None when
    the data is not there or the loader's size is unknown; bad names or options raise ConfigError."""
    fn = DATASETS.get(loader, "loader")
    check_options(loader, fn, options)
    size = _TRAIN_SIZES.get(loader)
    return None if size is None else size(Path(data_dir), **options)
