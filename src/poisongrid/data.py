"""Datasets as uint8 NCHW arrays: one loader per name, registered in DATASETS.

Every loader returns RGB images (C == 3; grayscale is replicated) as uint8 (N, 3, H, W) and
int64 labels, in a deterministic order (sorted files or the dataset's own file order).

Variable-size sets (gtsrb, imagenette, imagenet) are resized ONCE at load: the shorter side is
scaled to `image_size` with PIL bilinear, then the centre `image_size` x `image_size` square is
cropped. The result is cached as .npy files under `cache_dir` (default `<data_dir>/.poisongrid-cache`)
and later loads memory-map it read-only, because decoding thousands of JPEGs is slow and ImageNet
at 224 px (~190 GB) does not fit in RAM. Copy a split's images before writing into them.
"""
from __future__ import annotations

import inspect
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .errors import ConfigError, DatasetError
from .io import atomic_path
from .registry import Registry


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


# Each loader is called as loader(data_dir: Path, image_size: int | None, download: bool,
# cache_dir: Path, **options); its keyword-only parameters are the options it accepts.
DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")


def load_dataset(name: str, *, data_dir: str | os.PathLike = "data", image_size: int | None = None,
                 download: bool = False, cache_dir: str | os.PathLike | None = None, **options) -> Dataset:
    """Load dataset `name`; unknown names, options or bad option values raise ConfigError."""
    loader = DATASETS.get(name, "dataset")
    allowed = sorted(p.name for p in inspect.signature(loader).parameters.values() if p.kind is p.KEYWORD_ONLY)
    for k, v in options.items():
        if k not in allowed:
            raise ConfigError(f"options.{k}", v, f"only the options {allowed} for dataset loader '{name}'")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError("image_size", image_size, "a positive integer or null")
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir / ".poisongrid-cache"
    return loader(data_dir, image_size, download, cache_dir, **options)


# ---- helpers --------------------------------------------------------------------------------------


def _missing(what: str, path: Path, layout: str, how: str) -> DatasetError:
    return DatasetError(
        f"{what} not found: looked for {path}. Expected layout: {layout}. To obtain it: set download: true "
        f"where the internet is reachable, or {how}."
    )


def _resize_square(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side -> size (PIL bilinear), centre-crop size x size, RGB; returns uint8 (3, size, size)."""
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _decode_into(ds, out: np.ndarray, labels: np.ndarray, size: int, chunk: int = 1024) -> None:
    """Decode + resize ds[i] (a (PIL image, label) pair) into out[i]; threads, since PIL releases the GIL."""
    def one(i):
        img, y = ds[i]
        return _resize_square(img, size), y

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        for start in range(0, len(ds), chunk):  # chunked so ImageNet never queues a million futures
            idx = range(start, min(start + chunk, len(ds)))
            for i, (arr, y) in zip(idx, ex.map(one, idx)):
                out[i], labels[i] = arr, y


def _cached(name: str, tag: str, size: int, cache_dir: Path, source: Path,
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
                _decode_into(ds, out, labels, size)
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


def _torchvision(make: Callable, err: DatasetError):
    """Construct a torchvision dataset, turning its 'Dataset not found' (and I/O) errors into `err`."""
    try:
        return make()
    except (RuntimeError, OSError) as e:
        raise DatasetError(f"{err} (torchvision said: {e})") from None


def _class_dirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


# ---- loaders --------------------------------------------------------------------------------------


@DATASETS.register("digits")
def _digits(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path, *,
            test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (ships with sklearn), values 0..16 -> round(v*255/16), upscaled by
    NEAREST-NEIGHBOUR to image_size (default 32), replicated to 3 channels. The stratified split
    depends only on test_fraction and split_seed (not the experiment seed), so it is bit-reproducible."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError("options.test_fraction", test_fraction, "a number strictly between 0 and 1")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ConfigError("options.split_seed", split_seed, "a non-negative integer")
    size = image_size or 32
    d = load_digits()
    x = np.rint(d.images * (255 / 16)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    src = (np.arange(size) * 8) // size  # nearest source row/column for each output pixel
    x = x[:, src][:, :, src]
    x = np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))
    y = d.target.astype(np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=split_seed, stratify=y)
    tr, te = np.sort(tr), np.sort(te)
    return Dataset("digits", Split(x[tr], y[tr]), Split(x[te], y[te]), [str(i) for i in range(10)])


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


def _unpickle(path: Path) -> dict:
    """An official CIFAR python batch; keys decoded to str whether the pickle stored bytes or str."""
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        raise DatasetError(f"{path}: not a readable CIFAR-10 batch ({e}); delete cifar-10-batches-py and fetch it again") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


@DATASETS.register("cifar10")
def _cifar10(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path) -> Dataset:
    """CIFAR-10 from the official python batches in <data_dir>/cifar-10-batches-py.

    torchvision.datasets.CIFAR10 verifies the md5 of every batch on each construction, so it is
    used only to download (and verify) the archive when download is true; the batches are then
    read here with the same format torchvision reads (latin1 pickles: 'data' (N, 3072) uint8 in
    CHW order, 'labels'; batches.meta 'label_names'). If image_size != 32 each image is resized
    with PIL bilinear (no cache: it is fast)."""
    folder = data_dir / "cifar-10-batches-py"
    if download:
        from torchvision.datasets import CIFAR10

        _torchvision(lambda: CIFAR10(root=str(data_dir), train=True, download=True),
                     DatasetError(f"CIFAR-10 download into {folder} failed"))
    for f in _CIFAR_FILES:
        if not (folder / f).is_file():
            raise _missing("CIFAR-10", folder / f, f"{folder}/{{{','.join(_CIFAR_FILES)}}} (python version)",
                           f"extract cifar-10-python.tar.gz into {data_dir} so that {folder / f} exists")

    def split(files):
        batches = [_unpickle(folder / f) for f in files]
        x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
        if image_size and image_size != 32:
            x = np.stack([_resize_square(Image.fromarray(im.transpose(1, 2, 0)), image_size) for im in x])
        return Split(np.ascontiguousarray(x), y)

    names = _unpickle(folder / "batches.meta")["label_names"]
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return Dataset("cifar10", split(_CIFAR_FILES[:5]), split(["test_batch"]), classes)


_GTSRB_CLASSES = [f"{i:05d}" for i in range(43)]


@DATASETS.register("gtsrb")
def _gtsrb(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path) -> Dataset:
    """GTSRB via torchvision.datasets.GTSRB; images (varying size) resized to image_size (default 32), cached."""
    from torchvision.datasets import GTSRB

    size, base = image_size or 32, data_dir / "gtsrb"
    train_dir, test_dir, gt = base / "GTSRB" / "Training", base / "GTSRB" / "Final_Test" / "Images", base / "GT-final_test.csv"
    layout = (f"{train_dir}/<00000..00042>/*.ppm (all 43 class folders), {test_dir}/*.ppm and {gt} "
              "(';'-separated with Filename and ClassId columns)")
    how = (f"extract GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip "
           f"into {base}")

    def build():
        if download:
            for s in ("train", "test"):
                _torchvision(lambda: GTSRB(root=str(data_dir), split=s, download=True),
                             DatasetError(f"GTSRB download into {base} failed"))
        for p, is_dir in ((train_dir, True), (test_dir, True), (gt, False)):
            if not (p.is_dir() if is_dir else p.is_file()):
                raise _missing("GTSRB", p, layout, f"{how} so that {p} exists")
        # torchvision numbers training classes by their position among the folders present, while
        # the test CSV holds absolute ClassIds: only a complete set of 43 folders makes them agree.
        if _class_dirs(train_dir) != _GTSRB_CLASSES:
            raise _missing("GTSRB", train_dir, layout, f"{how} (found class folders {_class_dirs(train_dir)[:5]}...)")
        err = _missing("GTSRB", base, layout, how)
        splits = {"train": _torchvision(lambda: GTSRB(root=str(data_dir), split="train"), err),
                  "test": _torchvision(lambda: GTSRB(root=str(data_dir), split="test"), err)}
        return splits, [str(i) for i in range(43)]

    return _cached("gtsrb", "", size, cache_dir, data_dir, build)


_IMAGENETTE_VARIANTS = {"full": "imagenette2", "320px": "imagenette2-320", "160px": "imagenette2-160"}


@DATASETS.register("imagenette")
def _imagenette(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path, *,
                variant: str = "full") -> Dataset:
    """Imagenette via torchvision.datasets.Imagenette (size=variant); 'val' is the test split.
    Resized to image_size (default 224), cached; classes are the first English name of each wnid."""
    from torchvision.datasets import Imagenette

    if variant not in _IMAGENETTE_VARIANTS:
        raise ConfigError("options.variant", variant, f"one of {list(_IMAGENETTE_VARIANTS)}")
    size, root = image_size or 224, data_dir / _IMAGENETTE_VARIANTS[variant]
    layout = f"{root}/{{train,val}}/<wnid>/*.JPEG with the same wnid folders in train and val"
    how = f"extract {root.name}.tgz into {data_dir}"

    def build():
        if download:
            _torchvision(lambda: Imagenette(root=str(data_dir), split="train", size=variant, download=True),
                         DatasetError(f"Imagenette download into {data_dir} failed"))
        for s in ("train", "val"):
            if not (root / s).is_dir() or not _class_dirs(root / s):
                raise _missing("Imagenette", root / s, layout, f"{how} so that {root / s} exists")
        if _class_dirs(root / "train") != _class_dirs(root / "val"):
            raise DatasetError(f"Imagenette at {root}: train/ and val/ hold different wnid folders; expected layout: {layout}")
        err = _missing("Imagenette", root, layout, how)
        try:
            splits = {s: _torchvision(lambda: Imagenette(root=str(data_dir), split=v, size=variant), err)
                      for s, v in (("train", "train"), ("test", "val"))}
        except KeyError as e:  # torchvision only knows the ten Imagenette wnids
            raise DatasetError(f"Imagenette at {root}: unknown class folder {e}; expected layout: {layout}") from None
        return splits, [names[0] for names in splits["train"].classes]

    return _cached("imagenette", variant, size, cache_dir, data_dir, build)


@DATASETS.register("imagenet")
def _imagenet(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path) -> Dataset:
    """ImageNet (or any ImageFolder tree) from <data_dir>/train and <data_dir>/val, one folder per
    class; val is the test split. Resized to image_size (default 224), cached; classes = folder
    names. Never downloaded (ImageNet needs a licence), whatever `download` says."""
    from torchvision.datasets import ImageFolder

    size = image_size or 224
    layout = f"{data_dir}/{{train,val}}/<class>/<images>, the same class folders in train and val"
    how = ("download ILSVRC2012 from image-net.org (download: true cannot fetch it), extract it and sort "
           f"val/ into class folders (e.g. with valprep.sh) so that {{path}} exists")

    def build():
        for s in ("train", "val"):
            if not (data_dir / s).is_dir() or not _class_dirs(data_dir / s):
                raise _missing("ImageNet", data_dir / s, layout, how.format(path=data_dir / s))
        classes = _class_dirs(data_dir / "train")
        if classes != _class_dirs(data_dir / "val"):
            raise DatasetError(f"ImageNet at {data_dir}: train/ and val/ hold different class folders; expected layout: {layout}")
        err = _missing("ImageNet", data_dir, layout, how.format(path=data_dir / "train"))
        splits = {s: _torchvision(lambda: ImageFolder(str(data_dir / v)), err) for s, v in (("train", "train"), ("test", "val"))}
        return splits, classes

    return _cached("imagenet", "", size, cache_dir, data_dir, build)
