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

import gzip
import hashlib
import inspect
import json
import math
import os
import pickle
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

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
    _check_options(name, loader, options)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError("image_size", image_size, "a positive integer or null")
    data_dir = Path(data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else data_dir / ".poisongrid-cache"
    return loader(data_dir, image_size, download, cache_dir, **options)


def _check_options(name: str, fn: Callable, options: dict) -> None:
    allowed = sorted(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY)
    for k, v in options.items():
        if k not in allowed:
            raise ConfigError(f"options.{k}", v, f"only the options {allowed} for dataset loader '{name}'")


# ---- helpers --------------------------------------------------------------------------------------


def _image():
    """PIL.Image, imported on first use: loading digits, CIFAR-10 at 32 px or a cache needs no PIL."""
    from PIL import Image

    return Image


def _missing(what: str, path: Path | str, layout: str, how: str) -> DatasetError:
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
        img = img.resize((nw, nh), _image().BILINEAR)
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


_DIGITS_N = 1797  # images in sklearn's digits


def _check_digits_options(test_fraction, split_seed) -> None:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ConfigError("options.test_fraction", test_fraction, "a number strictly between 0 and 1")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise ConfigError("options.split_seed", split_seed, "a non-negative integer")


@DATASETS.register("digits")
def _digits(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path, *,
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


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


# The published md5 of each file of cifar-10-python.tar.gz: a batch is unpickled only if it
# matches, since a pickle from an untrusted data folder could run code.
CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unpickle(path: Path) -> dict:
    """An official CIFAR python batch, after its checksum matched; keys decoded to str whether the
    pickle stored bytes or str."""
    want = CIFAR_MD5.get(path.name)
    got = _md5(path) if path.is_file() else None
    if want is None or got != want:
        raise DatasetError(f"{path}: md5 {got} is not the published {want} of CIFAR-10's {path.name}; it is not read "
                           "(a pickle can run code). Fetch cifar-10-python.tar.gz again and extract it")
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
            x = np.stack([_resize_square(_image().fromarray(im.transpose(1, 2, 0)), image_size) for im in x])
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


# ---- fashion_mnist --------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
# Where Debian's dataset-fashion-mnist package installs the four gzipped IDX files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801  # unsigned bytes, 3 and 1 dimensions


def _under(data_dir: Path, path) -> Path:
    """An option's path: absolute as given, relative to data_dir otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError("options.path", path, "a path (relative to data_dir, or absolute)")
    return Path(data_dir) / path


def _fashion_dirs(data_dir: Path, path) -> list[Path]:
    return [_under(data_dir, path)] if path is not None else [data_dir / "fashion-mnist", FASHION_MNIST_SYSTEM_DIR]


def _idx_file(folder: Path, stem: str) -> Path | None:
    # The uncompressed file wins when both are there: no decompression.
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def _fashion_find(dirs: list[Path]) -> dict[str, Path] | None:
    """The four files from the first folder that holds all of them."""
    for d in dirs:
        files = {stem: _idx_file(d, stem) for pair in _FASHION_FILES.values() for stem in pair}
        if all(files.values()):
            return files
    return None


def _fashion_missing(dirs: list[Path]) -> DatasetError:
    looked = " and ".join(
        f"{d / next(st for pair in _FASHION_FILES.values() for st in pair if _idx_file(d, st) is None)}[.gz]" for d in dirs)
    names = ", ".join(f"{st}[.gz]" for pair in _FASHION_FILES.values() for st in pair)
    how = (f"install Debian's package (apt-get install dataset-fashion-mnist puts them in {FASHION_MNIST_SYSTEM_DIR}) "
           f"or copy the four files from https://github.com/zalandoresearch/fashion-mnist into {dirs[0]}")
    return _missing("Fashion-MNIST", looked, f"the IDX files {names} (gzipped or not) in {' or '.join(map(str, dirs))}", how)


def _read_idx(path: Path, magic: int, header_only: bool = False) -> tuple[tuple[int, ...], np.ndarray | None]:
    """Parse an IDX file: big-endian magic, one uint32 per dimension, then the raw uint8 data.
    A wrong magic number or a data length other than the header declares is a DatasetError."""
    ndim = magic & 0xFF
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            head = fh.read(4 + 4 * ndim)
            body = None if header_only else fh.read()
    except (OSError, EOFError, zlib.error) as e:  # a cut-off or corrupt gzip stream
        raise DatasetError(f"{path}: unreadable ({e}); fetch the file again") from None
    got = int.from_bytes(head[:4], "big")
    if len(head) >= 4 and got != magic:  # checked first: the wrong file says more than a short one
        raise DatasetError(f"{path}: magic number 0x{got:08x}, expected 0x{magic:08x} "
                           f"(an IDX {'image' if ndim == 3 else 'label'} file of unsigned bytes)")
    if len(head) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: truncated IDX header ({len(head)} bytes); fetch the file again")
    dims = tuple(int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if body is None:
        return dims, None
    want = math.prod(dims)
    if len(body) != want:
        raise DatasetError(f"{path}: header declares {dims} ({want} bytes of data) but the file holds {len(body)}; "
                           f"it is {'truncated' if len(body) < want else 'not the file the header describes'}, fetch it again")
    return dims, np.frombuffer(body, np.uint8).reshape(dims)


def _gray_to_rgb(x: np.ndarray, size: int | None) -> np.ndarray:
    """(N, H, W) uint8 -> (N, 3, size, size)."""
    n, h, w = x.shape
    if size is not None and (size, size) != (h, w):
        if (h, w) == (28, 28) and size == 32:
            # Zero padding keeps every pixel as recorded (no interpolation blur) and matches the black
            # background, as LeNet-5 did for MNIST; triggers are then added on the same 28 px content.
            x = np.pad(x, ((0, 0), (2, 2), (2, 2)))
        else:
            return np.stack([_resize_square(_image().fromarray(im), size) for im in x]) if n else np.zeros((0, 3, size, size), np.uint8)
    return np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))


def _fashion_download(folder: Path) -> None:
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_url

    for fname, md5 in FashionMNIST.resources:  # the .gz files with their md5s
        _torchvision(lambda: download_url(FashionMNIST.mirrors[0] + fname, str(folder), fname, md5),
                     DatasetError(f"Fashion-MNIST download of {fname} into {folder} failed"))


@DATASETS.register("fashion_mnist")
def _fashion_mnist(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path, *,
                   path: str | None = None) -> Dataset:
    """Fashion-MNIST from its four IDX files (each optionally .gz), read from `path` (relative to
    data_dir, or absolute) or else from <data_dir>/fashion-mnist, then /usr/share/datasets/fashion-mnist
    (Debian's dataset-fashion-mnist). 28x28 grayscale replicated to 3 channels; image_size 32 pads
    2 px of zeros on each side, other sizes are resized bilinearly (no cache: it takes seconds)."""
    dirs = _fashion_dirs(data_dir, path)
    files = _fashion_find(dirs)
    if files is None and download:
        _fashion_download(dirs[0])
        files = _fashion_find(dirs)
    if files is None:
        raise _fashion_missing(dirs)
    splits = {}
    for s, (img_stem, lab_stem) in _FASHION_FILES.items():
        (n, _, _), x = _read_idx(files[img_stem], _IDX_IMAGES)
        (m,), y = _read_idx(files[lab_stem], _IDX_LABELS)
        if m != n:
            raise DatasetError(f"{files[lab_stem]}: {m} labels for the {n} images of {files[img_stem]}")
        if y.size and y.max() >= len(FASHION_MNIST_CLASSES):
            raise DatasetError(f"{files[lab_stem]}: label {int(y.max())} outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
        splits[s] = Split(_gray_to_rgb(x, image_size), y.astype(np.int64))
    if splits["train"].images.shape[1:] != splits["test"].images.shape[1:]:
        raise DatasetError(f"{files['t10k-images-idx3-ubyte']}: image size differs from {files['train-images-idx3-ubyte']}")
    return Dataset("fashion_mnist", splits["train"], splits["test"], list(FASHION_MNIST_CLASSES))


# ---- folder: a user's own images ------------------------------------------------------------------

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
    dirs = {s: [c for c in _class_dirs(base / s) if not c.startswith(".")] for s in ("train", "test")}
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
    """(RGB PIL image, label) per file, the torchvision-style dataset _cached's build() returns."""

    def __init__(self, items: list[tuple[Path, int]], expect: tuple[int, int] | None):
        self.items, self.expect = items, expect

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            with _image().open(path) as im:
                if self.expect is not None and im.size != self.expect:
                    raise ConfigError("image_size", None, f"an integer: images under {path.parents[2]} vary in size "
                                      f"({path} is {im.size[0]}x{im.size[1]}, others {self.expect[0]}x{self.expect[1]})")
                return im.convert("RGB"), label
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for an unreadable image
            raise DatasetError(f"{path}: not a readable image ({e})") from None


@DATASETS.register("folder")
def _folder(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path, *, root: str = "") -> Dataset:
    """A user's own images in <data_dir>/<root>/{train,test}/<class>/; classes are the sorted train
    folders. Resized to image_size (shorter side, centre crop) and cached; without image_size all
    images must share one square size, which is kept."""
    base = _folder_base(data_dir, root)
    classes, items = _folder_listing(base)
    expect = None
    size = image_size
    if size is None:
        first = items["train"][0][0]
        with _image().open(first) as im:
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
    return _cached("folder", h.hexdigest()[:16], size, cache_dir, base,
                   lambda: ({s: _ImageFiles(items[s], expect) for s in ("train", "test")}, classes))


# ---- npz: arrays a user saved with np.savez -----------------------------------------------------

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_file(data_dir: Path, path) -> Path:
    if path is None:
        raise ConfigError("options.path", None, "the .npz file to load (relative to data_dir, or absolute)")
    return _under(data_dir, path)


def _npz_missing(file: Path) -> DatasetError:
    return DatasetError(f"npz dataset not found: looked for {file}. Expected layout: one .npz holding {', '.join(_NPZ_KEYS)} "
                        "(uint8 images N x H x W, N x H x W x C or N x C x H x W with C 1 or 3; integer labels) and "
                        "optionally classes. To obtain it: write it with np.savez(path, x_train=..., y_train=..., "
                        "x_test=..., y_test=...) and set options.path; download: true cannot fetch it.")


def _npz_images(file: Path, key: str, x: np.ndarray) -> np.ndarray:
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


@DATASETS.register("npz")
def _npz(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path, *, path: str | None = None) -> Dataset:
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
    x = {s: _npz_images(file, f"x_{s}", arrays[f"x_{s}"]) for s in ("train", "test")}
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
                x[s] = np.stack([_resize_square(_image().fromarray(im.transpose(1, 2, 0)), image_size) for im in x[s]])
    return Dataset("npz", Split(x["train"], y["train"]), Split(x["test"], y["test"]), classes)


# ---- training-set sizes from metadata ------------------------------------------------------------


def _npz_train_size(data_dir: Path, *, path: str | None = None) -> int | None:
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


def _fashion_train_size(data_dir: Path, *, path: str | None = None) -> int | None:
    files = _fashion_find(_fashion_dirs(data_dir, path))
    return None if files is None else _read_idx(files["train-images-idx3-ubyte"], _IDX_IMAGES, header_only=True)[0][0]


def _folder_train_size(data_dir: Path, *, root: str = "") -> int | None:
    base = _folder_base(data_dir, root)
    if not (base / "train").is_dir():
        return None
    return sum(len(_image_files(base / "train" / c)) for c in _class_dirs(base / "train") if not c.startswith("."))


def _digits_train_size(data_dir: Path, *, test_fraction: float = 0.2, split_seed: int = 0) -> int:
    _check_digits_options(test_fraction, split_seed)
    return _DIGITS_N - math.ceil(test_fraction * _DIGITS_N)  # sklearn's train_test_split rounds the test part up


_TRAIN_SIZES: dict[str, Callable[..., int | None]] = {
    "cifar10": lambda data_dir: 50000,
    "gtsrb": lambda data_dir: 26640,
    "imagenette": lambda data_dir, variant="full": 9469,
    "imagenet": lambda data_dir: 1281167,
    "digits": _digits_train_size,
    "fashion_mnist": _fashion_train_size,
    "folder": _folder_train_size,
    "npz": _npz_train_size,
}


def train_size(loader: str, data_dir: str | os.PathLike, options: dict) -> int | None:
    """Number of training examples of `loader` with `options`, from metadata only (no image is
    decoded): fixed sizes for the standard sets, headers or file counts for the others. None when
    the data is not there or the loader's size is unknown; bad names or options raise ConfigError."""
    fn = DATASETS.get(loader, "loader")
    _check_options(loader, fn, options)
    size = _TRAIN_SIZES.get(loader)
    return None if size is None else size(Path(data_dir), **options)
