"""cifar10: the official python batches, unpickled only after their published md5 matched."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .base import Dataset, Split, missing_error, pil_image, resize_square, via_torchvision


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


def load(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path) -> Dataset:
    """CIFAR-10 from the official python batches in <data_dir>/cifar-10-batches-py.

    torchvision.datasets.CIFAR10 verifies the md5 of every batch on each construction, so it is
    used only to download (and verify) the archive when download is true; the batches are then
    read here with the same format torchvision reads (latin1 pickles: 'data' (N, 3072) uint8 in
    CHW order, 'labels'; batches.meta 'label_names'). If image_size != 32 each image is resized
    with PIL bilinear (no cache: it is fast)."""
    folder = data_dir / "cifar-10-batches-py"
    if download:
        from torchvision.datasets import CIFAR10

        via_torchvision(lambda: CIFAR10(root=str(data_dir), train=True, download=True),
                        DatasetError(f"CIFAR-10 download into {folder} failed"))
    locate(data_dir)

    def split(files):
        batches = [_unpickle(folder / f) for f in files]
        x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
        if image_size and image_size != 32:
            x = np.stack([resize_square(pil_image().fromarray(im.transpose(1, 2, 0)), image_size) for im in x])
        return Split(np.ascontiguousarray(x), y)

    names = _unpickle(folder / "batches.meta")["label_names"]
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return Dataset("cifar10", split(_CIFAR_FILES[:5]), split(["test_batch"]), classes)


def locate(data_dir: Path) -> None:
    """Refuse, saying where the files belong, unless the batches are where load reads them."""
    folder = data_dir / "cifar-10-batches-py"
    for f in _CIFAR_FILES:
        if not (folder / f).is_file():
            raise missing_error("CIFAR-10", folder / f, f"{folder}/{{{','.join(_CIFAR_FILES)}}} (python version)",
                                f"extract cifar-10-python.tar.gz into {data_dir} so that {folder / f} exists")


def train_size(data_dir: Path) -> int:
    return 50000
