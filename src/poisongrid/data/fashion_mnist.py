"""fashion_mnist: the four IDX files of Fashion-MNIST, from data_dir or Debian's package."""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .base import Dataset, Split, missing_error, option_path, pil_image, resize_square, via_torchvision


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
# Where Debian's dataset-fashion-mnist package installs the four gzipped IDX files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801  # unsigned bytes, 3 and 1 dimensions


def _fashion_dirs(data_dir: Path, path) -> list[Path]:
    return [option_path(data_dir, path)] if path is not None else [data_dir / "fashion-mnist", FASHION_MNIST_SYSTEM_DIR]


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
    return missing_error("Fashion-MNIST", looked,
                         f"the IDX files {names} (gzipped or not) in {' or '.join(map(str, dirs))}", how)


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
            return np.stack([resize_square(pil_image().fromarray(im), size) for im in x]) if n else np.zeros((0, 3, size, size), np.uint8)
    return np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))


def _fashion_download(folder: Path) -> None:
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_url

    for fname, md5 in FashionMNIST.resources:  # the .gz files with their md5s
        via_torchvision(lambda: download_url(FashionMNIST.mirrors[0] + fname, str(folder), fname, md5),
                        DatasetError(f"Fashion-MNIST download of {fname} into {folder} failed"))


def load(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path, *,
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


def locate(data_dir: Path, *, path: str | None = None) -> None:
    """Refuse, saying where the files belong, unless the four IDX files are where load reads them."""
    dirs = _fashion_dirs(data_dir, path)
    if _fashion_find(dirs) is None:
        raise _fashion_missing(dirs)


def train_size(data_dir: Path, *, path: str | None = None) -> int | None:
    files = _fashion_find(_fashion_dirs(data_dir, path))
    return None if files is None else _read_idx(files["train-images-idx3-ubyte"], _IDX_IMAGES, header_only=True)[0][0]
