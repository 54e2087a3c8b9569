"""What an artifact was made for, and the check that a stage reads only artifacts of its own cell.

Every artifact records `cell` in its metadata (dataset, scenario, seed, and the defender model,
detector or defense it belongs to). A file copied or moved into another cell's folder, or made
from other inputs, is refused with a message naming it, instead of giving silently wrong numbers."""
from __future__ import annotations

from .errors import ArtifactError


def cell(dataset: str, scenario: str | None, seed: int | None, **role) -> dict:
    out = {"dataset": dataset, "scenario": scenario, "seed": None if seed is None else int(seed)}
    out.update({k: v for k, v in role.items() if v is not None})
    return out


def of_role(ref: dict, **role) -> dict:
    """The cell of an artifact derived from `ref`'s (dataset, scenario, seed) with its own role."""
    return cell(ref["dataset"], ref["scenario"], ref["seed"], **role)


def of(meta: dict, path) -> dict:
    c = (meta or {}).get("cell")
    if not isinstance(c, dict):
        raise ArtifactError(f"{path}: records no cell it was made for (written by an older version, or not by this "
                            "workflow); delete it and rerun the stage that makes it")
    return c


def _fmt(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items() if v is not None)


def check(path, meta: dict, **expected) -> dict:
    """The artifact's cell, after checking every expected key that is not None."""
    c = of(meta, path)
    want = {k: v for k, v in expected.items() if v is not None}
    if any(c.get(k) != v for k, v in want.items()):
        raise ArtifactError(f"{path}: was made for {_fmt(c)}, but this job is for {_fmt(want)} (a file copied or moved "
                            "between cells?); delete it and rerun the stage that makes it")
    return c


def same_cell(path, meta: dict, ref: dict, **role) -> dict:
    """Check an input belongs to the same dataset/scenario/seed as `ref` (the manifest's cell)."""
    return check(path, meta, **{k: ref.get(k) for k in ("dataset", "scenario", "seed")}, **role)
