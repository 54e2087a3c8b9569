"""imagenette: Imagenette through torchvision, resized once and cached."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, DatasetError
from .base import Dataset, cached_dataset, class_dirs, missing_error, via_torchvision


_IMAGENETTE_VARIANTS = {"full": "imagenette2", "320px": "imagenette2-320", "160px": "imagenette2-160"}


def load(data_dir: Path, image_size: int | None, download: bool, cache_dir: Path, *,
         variant: str = "full") -> Dataset:
    """Imagenette via torchvision.datasets.Imagenette (size=variant); 'val' is the test split.
    Resized to image_size (default 224), cached; classes are the first English name of each wnid."""
    from torchvision.datasets import Imagenette

    size, root = image_size or 224, _root(data_dir, variant)

    def build():
        if download:
            via_torchvision(lambda: Imagenette(root=str(data_dir), split="train", size=variant, download=True),
                            DatasetError(f"Imagenette download into {data_dir} failed"))
        layout, how = locate(data_dir, variant=variant)
        err = missing_error("Imagenette", root, layout, how)
        try:
            splits = {s: via_torchvision(lambda: Imagenette(root=str(data_dir), split=v, size=variant), err)
                      for s, v in (("train", "train"), ("test", "val"))}
        except KeyError as e:  # torchvision only knows the ten Imagenette wnids
            raise DatasetError(f"Imagenette at {root}: unknown class folder {e}; expected layout: {layout}") from None
        return splits, [names[0] for names in splits["train"].classes]

    return cached_dataset("imagenette", variant, size, cache_dir, data_dir, build)


def _root(data_dir: Path, variant: str) -> Path:
    if variant not in _IMAGENETTE_VARIANTS:
        raise ConfigError("options.variant", variant, f"one of {list(_IMAGENETTE_VARIANTS)}")
    return data_dir / _IMAGENETTE_VARIANTS[variant]


def locate(data_dir: Path, *, variant: str = "full") -> tuple[str, str]:
    """Refuse, saying where the files belong, unless the data is where load reads it; return the
    expected layout and how to get it."""
    root = _root(data_dir, variant)
    layout = f"{root}/{{train,val}}/<wnid>/*.JPEG with the same wnid folders in train and val"
    how = f"extract {root.name}.tgz into {data_dir}"
    for s in ("train", "val"):
        if not (root / s).is_dir() or not class_dirs(root / s):
            raise missing_error("Imagenette", root / s, layout, f"{how} so that {root / s} exists")
    if class_dirs(root / "train") != class_dirs(root / "val"):
        raise DatasetError(f"Imagenette at {root}: train/ and val/ hold different wnid folders; expected layout: {layout}")
    return layout, how


def train_size(data_dir: Path, *, variant: str = "full") -> int:
    return 9469
