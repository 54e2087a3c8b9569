"""imagenet: ImageNet (or any ImageFolder tree with train/ and val/), resized once and cached."""
from __future__ import annotations

from pathlib import Path

from ..errors import DatasetError
from .base import Dataset, cached_dataset, class_dirs, missing_error, via_torchvision


def load(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path) -> Dataset:
    """ImageNet (or any ImageFolder tree) from <data_dir>/train and <data_dir>/val, one folder per
    class; val is the test split. Resized to image_size (default 224), cached; classes = folder
    names. Never downloaded (ImageNet needs a licence), whatever `download` says."""
    from torchvision.datasets import ImageFolder

    size = image_size or 224

    def build():
        layout, how = locate(data_dir)
        classes = class_dirs(data_dir / "train")
        err = missing_error("ImageNet", data_dir, layout, how.format(path=data_dir / "train"))
        splits = {s: via_torchvision(lambda: ImageFolder(str(data_dir / v)), err) for s, v in (("train", "train"), ("test", "val"))}
        return splits, classes

    return cached_dataset("imagenet", "", size, cache_dir, data_dir, build)


def locate(data_dir: Path) -> tuple[str, str]:
    """Refuse, saying where the files belong, unless the data is where load reads it; return the
    expected layout and how to get it."""
    layout = f"{data_dir}/{{train,val}}/<class>/<images>, the same class folders in train and val"
    how = ("download ILSVRC2012 from image-net.org (download: true cannot fetch it), extract it and sort "
           "val/ into class folders (e.g. with valprep.sh) so that {path} exists")
    for s in ("train", "val"):
        if not (data_dir / s).is_dir() or not class_dirs(data_dir / s):
            raise missing_error("ImageNet", data_dir / s, layout, how.format(path=data_dir / s))
    if class_dirs(data_dir / "train") != class_dirs(data_dir / "val"):
        raise DatasetError(f"ImageNet at {data_dir}: train/ and val/ hold different class folders; expected layout: {layout}")
    return layout, how


def train_size(data_dir: Path) -> int:
    return 1281167
