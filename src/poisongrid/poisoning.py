"""Scenarios: choose targets and images, apply the attacks; then, apart, the bona fide examples.

Targets are drawn per attack from (seed, attack name) alone, so `single-x` and `multi` with the
same seed share each attack's target (and the Narcissus trigger made for it).

By default attacks never share an image (BaDLoss §3.1.1). With `overlap` (the case its Appendix F
discusses) each attack draws from every image it could use, including those an earlier attack
took. Attacks then apply in the order they choose (clean-label ones first, then the others in the
dataset's attack order), each trigger on top of the image as the earlier ones left it; the label
is the target of the last label-flipping attack (a clean-label attack never relabels, so a
clean-label image also taken by a label-flipping attack gets that attack's target). The manifest
keeps one row per example: `attack` names every attack on it joined by `+`, in that order, and
`target` is the last one's (always the row's label)."""
from __future__ import annotations

import json
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
    from .defender import DefenderImages

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
    table: pa.Table  # the manifest: index, label, orig_label, attack, target
    index: np.ndarray  # rows whose image changed
    images: np.ndarray  # their new uint8 images
    meta: dict  # targets, per-attack seeds and params, counts

    @property
    def manifest(self) -> pd.DataFrame:
        return self.table.to_pandas()


# Joins the attacks of an image several attacks share in the manifest's `attack` column.
SEP = "+"


def carries(attack_col, name: str) -> np.ndarray:
    """Which rows of a manifest's `attack` column carry attack `name` (alone or with others)."""
    import pandas as pd

    col = pd.Series(attack_col, dtype="string").fillna("")
    return col.str.split(SEP, regex=False).apply(lambda names: name in names).to_numpy(bool)


def attack_names(attack_col) -> list[str]:
    """Every attack named in an `attack` column, in order of first appearance."""
    import pandas as pd

    col = pd.Series(attack_col, dtype="string").dropna()
    return list(dict.fromkeys(a for v in col for a in v.split(SEP)))


def poison(ds: Dataset, attacks: dict[str, dict], all_attacks: list[str], seed: int,
           artifacts: dict[str, dict] | None = None, overlap: bool = False) -> PoisonedSet:
    from .attacks import ATTACKS
    from .attacks.base import attack_params
    from .defender import DefenderImages

    artifacts = artifacts or {}
    labels = ds.train.labels
    n = len(labels)
    targets = {a: draw_target(a, attacks[a], labels, ds.num_classes, seed) for a in attacks}
    rng = np.random.default_rng([seed, 2])
    used = np.zeros(n, dtype=bool)
    new_labels = labels.copy()
    attack_col = np.full(n, None, dtype=object)
    target_col = np.full(n, -1, dtype=np.int64)
    # The poisoned rows so far (sorted) and their current images.
    index, images, info = np.zeros(0, dtype=np.int64), np.zeros((0, *ds.image_shape), dtype=np.uint8), {}
    # Clean-label attacks choose first: they are confined to one class, the others can go anywhere.
    order = sorted(attacks, key=lambda a: (not ATTACKS.get(a).clean_label, all_attacks.index(a)))
    for name in order:
        cfg = attacks[name]
        atk = _build(name, cfg, ds.image_shape, seed, artifacts)
        t = targets[name]
        free = np.ones(n, dtype=bool) if overlap else ~used
        pool = np.flatnonzero(free & (labels == t)) if atk.clean_label else np.flatnonzero(free)
        k = _count(cfg, n)
        if k < 1:
            raise ConfigError(f"attacks.{name}.ratio", cfg["ratio"], f"a ratio that poisons at least one of {n} images (or set min_count)")
        if k > len(pool):
            raise ConfigError(f"attacks.{name}.ratio", cfg["ratio"], f"at most {len(pool)} available images ({k} requested)")
        chosen = np.sort(rng.choice(pool, size=k, replace=False))
        # Each trigger goes onto the image as earlier attacks left it (only ever clean without overlap).
        current = DefenderImages.overlay(ds.train.images, index, images)[chosen]
        index, images = _replace(index, images, chosen, atk.poison(current, chosen))
        attack_col[chosen] = [name if prev is None else f"{prev}{SEP}{name}" for prev in attack_col[chosen]]
        used[chosen] = True
        target_col[chosen] = t
        if not atk.clean_label:
            new_labels[chosen] = t
        info[name] = {"target": t, "seed": attack_seed(seed, name), "count": int(k), "clean_label": atk.clean_label,
                      "params": attack_params(cfg)}
        note = type(atk).budget_note(cfg.get("learn") or {}) if atk.learns() else None
        if note:
            info[name]["budget"] = note
    manifest = manifest_arrow(new_labels, labels, attack_col, target_col)
    meta = {"dataset": ds.name, "seed": seed, "attacks": info, "n_train": n, "num_classes": ds.num_classes,
            "image_shape": list(ds.image_shape)}
    if overlap:
        meta["overlap"] = True
        meta["n_shared"] = int(sum(a is not None and SEP in a for a in attack_col))
    return PoisonedSet(manifest, index, images, meta)


def _replace(index: np.ndarray, images: np.ndarray, rows: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted poisoned rows and their images with `rows` set to `new` (added or replaced)."""
    keep = ~np.isin(index, rows)
    idx = np.concatenate([index[keep], rows.astype(np.int64)])
    img = np.concatenate([images[keep], new])
    order = np.argsort(idx, kind="stable")
    return idx[order], img[order]


def _build(name: str, cfg: dict, shape, seed: int, artifacts: dict) -> Attack:
    from .attacks import ATTACKS, build_attack
    from .attacks.base import attack_params

    if ATTACKS.get(name).learns() and name not in artifacts:
        raise ConfigError(f"attacks.{name}", "no trigger file", "the file `poisongrid trigger` makes for it (--trigger)")
    return build_attack(name, shape, attack_seed(seed, name), attack_params(cfg), artifacts.get(name))


def draw_bona_fide(untouched: np.ndarray, labels: np.ndarray, num_classes: int, seed: int, cfg: dict) -> np.ndarray:
    """Which untouched examples the defender knows to be clean. A stream of its own, so the
    poisoned set (and every model trained on it) does not depend on this choice."""
    rng = np.random.default_rng([seed, 3])
    pool = np.asarray(untouched, dtype=bool)
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
    write_table(manifest_path, ps.table, MANIFEST_KIND, ps.meta)


def manifest_arrow(labels: np.ndarray, orig_labels: np.ndarray, attack_col: np.ndarray,
                   target_col: np.ndarray) -> pa.Table:
    """The manifest as Arrow, without importing pandas (0.2 s of a poison job's start): the same
    columns, types and pandas schema metadata `pa.Table.from_pandas` writes for the DataFrame
    (`attack` a pandas string column), so reading it back into pandas gives the same frame."""
    from importlib.metadata import PackageNotFoundError, version

    from .io import from_numpy, string_array

    n = len(labels)
    cols = {"index": from_numpy(np.arange(n, dtype=np.int64)), "label": from_numpy(labels.astype(np.int64)),
            "orig_label": from_numpy(orig_labels.astype(np.int64)), "attack": string_array(attack_col),
            "target": from_numpy(target_col.astype(np.int64))}
    try:
        pandas_version = version("pandas")
    except PackageNotFoundError:  # pragma: no cover - pandas is a dependency
        pandas_version = None
    described = [{"name": k, "field_name": k, "pandas_type": "object" if k == "attack" else "int64",
                  "numpy_type": "string" if k == "attack" else "int64", "metadata": None} for k in cols]
    pandas_meta = {"index_columns": [], "column_indexes": [], "columns": described, "attributes": {},
                   "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": pandas_version}
    return pa.table(cols).replace_schema_metadata({"pandas": json.dumps(pandas_meta)})


MANIFEST_COLUMNS = ("index", "label", "orig_label", "attack", "target")
BONA_FIDE_KIND = "bona_fide"


def read_manifest(path, bona_fide_path=None, columns=None) -> tuple[pd.DataFrame, dict]:
    """The manifest (all columns, or `columns`) as a DataFrame, with the `bona_fide` mask joined
    from its own file when one is given."""
    table, meta = manifest_table(path, ground_truth=True, bona_fide_path=bona_fide_path, columns=columns)
    return table.to_pandas(), meta


def write_bona_fide(path, index: np.ndarray, mask: np.ndarray, meta: dict) -> None:
    from .io import from_numpy

    write_table(path, pa.table({"index": from_numpy(np.asarray(index, dtype=np.int64)),
                                "bona_fide": from_numpy(np.asarray(mask, dtype=bool))}), BONA_FIDE_KIND, meta)


def read_bona_fide(path, index: np.ndarray, manifest_meta: dict) -> np.ndarray:
    """The bona fide mask aligned to the manifest's `index`, checked to be drawn from that manifest."""
    from . import provenance
    from .io import to_numpy

    table, meta = read_table(path, BONA_FIDE_KIND, require=("index", "bona_fide"))
    provenance.same_cell(path, meta, provenance.of(manifest_meta, "the manifest"))
    if meta.get("manifest_n") != len(index) or meta.get("manifest_fingerprint") != manifest_fingerprint(manifest_meta):
        raise ArtifactError(f"{path}: drawn from another poisoned set than this manifest; delete it and rerun the bonafide stage")
    got = to_numpy(table.column("index"))
    if len(got) != len(index) or not np.array_equal(np.sort(got), np.sort(index)):
        raise ArtifactError(f"{path}: covers other examples than the manifest; delete it and rerun the bonafide stage")
    mask = np.zeros(int(index.max()) + 1 if len(index) else 0, dtype=bool)
    mask[got] = to_numpy(table.column("bona_fide"))
    mask = mask[index]
    n_clean = meta.get("n_clean")
    if n_clean is not None and int(mask.sum()) != int(n_clean):
        raise ArtifactError(f"{path}: marks {int(mask.sum())} examples bona fide, but it was drawn with {n_clean}; "
                            "delete it and rerun the bonafide stage")
    return mask


def manifest_fingerprint(meta: dict) -> str:
    """What identifies a poisoned set: its cell, attacks (targets, counts, parameters) and size."""
    import hashlib

    keys = {k: meta.get(k) for k in ("cell", "attacks", "n_train", "dataset", "seed")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


# What a defense may read: never the ground truth. `bona_fide` comes from the bona fide file.
DEFENDER_COLUMNS = ["index", "label", "bona_fide"]


def manifest_table(path, ground_truth: bool = False, bona_fide_path=None, columns=None) -> tuple[pa.Table, dict]:
    """The manifest as an Arrow table (no pandas: the light jobs read it), the defender's columns
    only unless `ground_truth` (or the given `columns`), with `bona_fide` appended from its file
    when one is given (checked against the manifest's ground truth: a bona fide example is never a
    poisoned one)."""
    from .io import from_numpy, to_numpy

    if ground_truth:
        table, meta = read_table(path, MANIFEST_KIND, require=MANIFEST_COLUMNS, columns=columns)
    else:
        table, meta = read_table(path, MANIFEST_KIND, columns=DEFENDER_COLUMNS[:2])
    if bona_fide_path is not None:
        mask = read_bona_fide(bona_fide_path, to_numpy(table.column("index")), meta)
        attack = table.column("attack") if "attack" in table.column_names else \
            read_table(path, MANIFEST_KIND, columns=["attack"])[0].column("attack")
        touched = ~to_numpy(attack.is_null())
        if (mask & touched).any():
            raise ArtifactError(f"{bona_fide_path}: marks {int((mask & touched).sum())} poisoned example(s) as bona fide; "
                                "the bona fide set is drawn from untouched examples: delete it and rerun the bonafide stage")
        table = table.append_column("bona_fide", from_numpy(mask))
    return table, meta


def training_images(ds: Dataset, images_path, n_manifest: int) -> DefenderImages:
    """The poisoned training images as one set: the clean set with the stored rows swapped in
    (poisoned.npz holds the poisoned rows only, or every row)."""
    from .defender import DefenderImages

    z = load_npz(images_path, keys=("index", "images"))
    if n_manifest != len(ds.train.labels):
        raise ArtifactError(f"manifest has {n_manifest} rows but dataset '{ds.name}' has {len(ds.train.labels)} training images")
    if z["images"].shape[1:] != ds.train.images.shape[1:]:
        raise ArtifactError(f"{images_path}: images of shape {z['images'].shape[1:]}, the dataset's are {ds.train.images.shape[1:]}")
    return DefenderImages.overlay(ds.train.images, z["index"], z["images"])


def test_attacks(meta: dict, shape, artifacts: dict[str, dict]) -> dict[str, tuple[Attack, int]]:
    """Rebuild each attack of a manifest (same seed and params, and what it learned) with its
    target; `apply` gives its test-time trigger."""
    from .attacks import build_attack

    out = {}
    for name, info in meta["attacks"].items():
        out[name] = (build_attack(name, shape, info["seed"], dict(info["params"]), artifacts.get(name)), int(info["target"]))
    return out
