"""gtsrb: GTSRB through torchvision, resized once and cached."""
from __future__ import annotations

from pathlib import Path

from ..errors import DatasetError
from .base import Dataset, cached_dataset, class_dirs, missing_error, via_torchvision


_GTSRB_CLASSES = [f"{i:05d}" for i in range(43)]


def load(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path) -> Dataset:
    """GTSRB via torchvision.datasets.GTSRB; images (varying size) resized to image_size (default 32), cached."""
    from torchvision.datasets import GTSRB

    size, base = image_size or 32, data_dir / "gtsrb"

    def build():
        if download:
            for s in ("train", "test"):
                via_torchvision(lambda: GTSRB(root=str(data_dir), split=s, download=True),
                                DatasetError(f"GTSRB download into {base} failed"))
        layout, how = locate(data_dir)
        err = missing_error("GTSRB", base, layout, how)
        splits = {"train": via_torchvision(lambda: GTSRB(root=str(data_dir), split="train"), err),
                  "test": via_torchvision(lambda: GTSRB(root=str(data_dir), split="test"), err)}
        return splits, [str(i) for i in range(43)]

    return cached_dataset("gtsrb", "", size, cache_dir, data_dir, build)


def locate(data_dir: Path) -> tuple[str, str]:
    """Refuse, saying where the files belong, unless the data is where load reads it; return the
    expected layout and how to get it."""
    base = data_dir / "gtsrb"
    train_dir, test_dir, gt = base / "GTSRB" / "Training", base / "GTSRB" / "Final_Test" / "Images", base / "GT-final_test.csv"
    layout = (f"{train_dir}/<00000..00042>/*.ppm (all 43 class folders), {test_dir}/*.ppm and {gt} "
              "(';'-separated with Filename and ClassId columns)")
    how = (f"extract GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip "
           f"into {base}")
    for p, is_dir in ((train_dir, True), (test_dir, True), (gt, False)):
        if not (p.is_dir() if is_dir else p.is_file()):
            raise missing_error("GTSRB", p, layout, f"{how} so that {p} exists")
    # torchvision numbers training classes by their position among the folders present, while
    # the test CSV holds absolute ClassIds: only a complete set of 43 folders makes them agree.
    if class_dirs(train_dir) != _GTSRB_CLASSES:
        raise missing_error("GTSRB", train_dir, layout, f"{how} (found class folders {class_dirs(train_dir)[:5]}...)")
    return layout, how


def train_size(data_dir: Path) -> int:
    return 26640
