"""Scenarios: choose targets and images, apply the attacks, mark bona fide examples.

Targets are drawn per attack from (seed, attack name) alone, so `single-x` and `multi` with the
same seed share each attack's target (and the Narcissus trigger made for it)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from .errors import ArtifactError, ConfigError
from .io import load_npz, read_table, save_npz, write_table

if TYPE_CHECKING:
    import pandas as pd

    from .attacks import Attack
    from .data import Dataset

# pandas and the attack registry are imported where used: the score and plan stages import this
# module for the manifest's name and columns only.

MANIFEST_KIND = "manifest"


def attack_seed(seed: int, name: str) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def draw_target(name: str, cfg: dict, labels: np.ndarray, num_classes: int, seed: int) -> int:
    """The configured `target` class, else a uniformly random one; clean-label attacks redraw
    until the class is large enough."""
    from .attacks import ATTACKS

    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 1])
    counts = np.bincount(labels, minlength=num_classes)
    need = cfg.get("min_target_count", 0)
    if ATTACKS.get(name).clean_label:
        need = max(need, _count(cfg, len(labels)))
    fixed = cfg.get("target")
    if fixed is not None:
        if not 0 <= fixed < num_classes:
            raise ConfigError(f"attacks.{name}.target", fixed, f"a class in [0, {num_classes - 1}]")
        if counts[fixed] < need:
            raise ConfigError(f"attacks.{name}.target", fixed, f"a class with at least {need} training images (class {fixed} has {counts[fixed]})")
        return int(fixed)
    if counts.max() < need:
        raise ConfigError(f"attacks.{name}", cfg, f"settings whose target class can hold {need} images (largest class has {counts.max()})")
    while True:
        t = int(rng.integers(num_classes))
        if counts[t] >= need:
            return t


def _count(cfg: dict, n: int) -> int:
    return max(int(n * cfg["ratio"]), int(cfg.get("min_count", 0)))


@dataclass
class PoisonedSet:
    manifest: pd.DataFrame  # index, label, orig_label, attack, target, bona_fide
    index: np.ndarray  # rows whose image changed
    images: np.ndarray  # their new uint8 images
    meta: dict  # targets, per-attack seeds and params, counts


def poison(ds: Dataset, attacks: dict[str, dict], all_attacks: list[str], seed: int, bona_fide: dict,
           artifacts: dict[str, dict] | None = None) -> PoisonedSet:
    import pandas as pd

    from .attacks import ATTACKS
    from .config import attack_params

    artifacts = artifacts or {}
    labels = ds.train.labels
    n = len(labels)
    targets = {a: draw_target(a, attacks[a], labels, ds.num_classes, seed) for a in attacks}
    rng = np.random.default_rng([seed, 2])
    used = np.zeros(n, dtype=bool)
    new_labels = labels.copy()
    attack_col = np.full(n, None, dtype=object)
    target_col = np.full(n, -1, dtype=np.int64)
    idx_parts, img_parts, info = [], [], {}
    # Clean-label attacks choose first: they are confined to one class, the others can go anywhere.
    order = sorted(attacks, key=lambda a: (not ATTACKS.get(a).clean_label, all_attacks.index(a)))
    for name in order:
        cfg = attacks[name]
        atk = _build(name, cfg, ds.image_shape, seed, artifacts)
        t = targets[name]
        pool = np.flatnonzero(~used & (labels == t)) if atk.clean_label else np.flatnonzero(~used)
        k = _count(cfg, n)
        if k < 1:
            raise ConfigError(f"attacks.{name}.ratio", cfg["ratio"], f"a ratio that poisons at least one of {n} images (or set min_count)")
        if k > len(pool):
            raise ConfigError(f"attacks.{name}.ratio", cfg["ratio"], f"at most {len(pool)} available images ({k} requested)")
        chosen = np.sort(rng.choice(pool, size=k, replace=False))
        used[chosen] = True
        idx_parts.append(chosen)
        img_parts.append(atk.poison(ds.train.images[chosen], chosen))
        attack_col[chosen] = name
        target_col[chosen] = t
        if not atk.clean_label:
            new_labels[chosen] = t
        info[name] = {"target": t, "seed": attack_seed(seed, name), "count": int(k), "clean_label": atk.clean_label,
                      "params": attack_params(cfg)}
    bona = _bona_fide(~used, labels, ds.num_classes, bona_fide, rng)
    manifest = pd.DataFrame({
        "index": np.arange(n, dtype=np.int64), "label": new_labels.astype(np.int64),
        "orig_label": labels.astype(np.int64), "attack": pd.array(attack_col, dtype="string"),
        "target": target_col, "bona_fide": bona,
    })
    index = np.concatenate(idx_parts) if idx_parts else np.zeros(0, dtype=np.int64)
    images = np.concatenate(img_parts) if img_parts else np.zeros((0, *ds.image_shape), dtype=np.uint8)
    order = np.argsort(index)
    meta = {"dataset": ds.name, "seed": seed, "attacks": info, "n_train": n, "num_classes": ds.num_classes,
            "image_shape": list(ds.image_shape)}
    return PoisonedSet(manifest, index[order].astype(np.int64), images[order], meta)


def _build(name: str, cfg: dict, shape, seed: int, artifacts: dict) -> Attack:
    from .attacks import ATTACKS, build_attack
    from .config import attack_params

    if ATTACKS.get(name).learns() and name not in artifacts:
        raise ConfigError(f"attacks.{name}", "no trigger file", "the file `poisongrid trigger` makes for it (--trigger)")
    return build_attack(name, shape, attack_seed(seed, name), attack_params(cfg), artifacts.get(name))


def _bona_fide(pool: np.ndarray, labels: np.ndarray, num_classes: int, cfg: dict, rng) -> np.ndarray:
    n_clean = int(cfg["n_clean"])
    cand = np.flatnonzero(pool)
    if n_clean > len(cand):
        raise ConfigError("bona_fide.n_clean", n_clean, f"at most {len(cand)} (the untouched examples)")
    out = np.zeros(len(labels), dtype=bool)
    if not cfg.get("stratified"):
        out[rng.choice(cand, size=n_clean, replace=False)] = True
        return out
    # Stratified: classes take turns, so each class gets n_clean / num_classes (or all it has).
    per_class = [rng.permutation(cand[labels[cand] == c]) for c in range(num_classes)]
    picked, i = [], 0
    while len(picked) < n_clean:
        for c in range(num_classes):
            if i < len(per_class[c]) and len(picked) < n_clean:
                picked.append(per_class[c][i])
        i += 1
    out[np.asarray(picked, dtype=np.int64)] = True
    return out


def write(ps: PoisonedSet, manifest_path, images_path) -> None:
    save_npz(images_path, index=ps.index, images=ps.images)
    write_table(manifest_path, pa.Table.from_pandas(ps.manifest, preserve_index=False), MANIFEST_KIND, ps.meta)


MANIFEST_COLUMNS = ("index", "label", "orig_label", "attack", "target", "bona_fide")


def read_manifest(path) -> tuple[pd.DataFrame, dict]:
    table, meta = read_table(path, MANIFEST_KIND, require=MANIFEST_COLUMNS)
    return table.to_pandas(), meta


DEFENDER_COLUMNS = ["index", "label", "bona_fide"]  # what a defense may read: never the ground truth


def manifest_table(path, ground_truth: bool = False) -> tuple[pa.Table, dict]:
    """The manifest as an Arrow table (no pandas: the light jobs read it), the defender's columns
    only unless `ground_truth`."""
    if ground_truth:
        return read_table(path, MANIFEST_KIND, require=MANIFEST_COLUMNS)
    return read_table(path, MANIFEST_KIND, columns=DEFENDER_COLUMNS)


class TrainingImages:
    """The poisoned training set without copying the clean one: rows come from the (possibly
    memory-mapped) clean array, with the poisoned rows swapped in. Indexable by integer arrays."""

    def __init__(self, base: np.ndarray, index: np.ndarray, images: np.ndarray, rows: np.ndarray | None = None):
        self.base, self.index, self.images = base, np.asarray(index, dtype=np.int64), images
        self.rows = np.arange(len(base), dtype=np.int64) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.base.shape[1:])

    @property
    def nbytes(self) -> int:
        return len(self.rows) * int(np.prod(self.base.shape[1:])) * self.base.itemsize

    def subset(self, mask: np.ndarray) -> "TrainingImages":
        return TrainingImages(self.base, self.index, self.images, self.rows[mask])

    def __getitem__(self, idx) -> np.ndarray:
        rows = self.rows[idx]
        out = np.array(self.base[rows])
        if not len(self.index):  # nothing poisoned (the clean scenario)
            return out
        pos = np.searchsorted(self.index, rows)
        hit = (pos < len(self.index)) & (self.index[np.minimum(pos, len(self.index) - 1)] == rows)
        out[hit] = self.images[pos[hit]]
        return out

    def materialize(self) -> np.ndarray:
        return self[np.arange(len(self.rows))]


def training_images(ds: Dataset, images_path, manifest: pd.DataFrame) -> TrainingImages:
    """The poisoned training images: the clean set with the poisoned rows swapped in."""
    z = load_npz(images_path, keys=("index", "images"))
    if len(manifest) != len(ds.train.labels):
        raise ArtifactError(f"manifest has {len(manifest)} rows but dataset '{ds.name}' has {len(ds.train.labels)} training images")
    if z["images"].shape[1:] != ds.train.images.shape[1:]:
        raise ArtifactError(f"{images_path}: images of shape {z['images'].shape[1:]}, the dataset's are {ds.train.images.shape[1:]}")
    return TrainingImages(ds.train.images, z["index"], z["images"])


def test_attacks(meta: dict, shape, artifacts: dict[str, dict]) -> dict[str, tuple[Attack, int]]:
    """Rebuild each attack of a manifest (same seed and params, and what it learned) with its
    target; `apply` gives its test-time trigger."""
    from .attacks import build_attack

    out = {}
    for name, info in meta["attacks"].items():
        out[name] = (build_attack(name, shape, info["seed"], dict(info["params"]), artifacts.get(name)), int(info["target"]))
    return out
