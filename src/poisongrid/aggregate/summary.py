"""The tidy summary of a grid's cells (one row per cell and attack, from their metrics.json files)
and its statistics over seeds."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import ArtifactError
from ..io import atomic_path, read_json, write_table

CELL = ["dataset", "scenario", "seed", "defense"]
# Rejection by the plan (weight 0), from each cell's per-class counts: clean examples overall and
# in the largest and smallest TAIL_FRACTION of classes by training-set size (mean of the classes'
# rates), the poisoned examples; how many classes each tail holds and their mean size.
TAIL_FRACTION = 0.1
REJECTION_COLUMNS = ["clean_rejected", "clean_rejected_top", "clean_rejected_bottom", "poisoned_rejected",
                     "n_classes", "tail_classes", "size_top", "size_bottom"]
CELL_COLUMNS = ["clean_accuracy", "mean_asr", "mean_asr_boosted", "auroc", "recall_removed", "precision_removed",
                "n_train", "n_poisoned", "n_removed", "n_ascent", "wall_time_total_s", "cost_epochs_models",
                "cost_epochs_final", "cost_epochs", "cost_wall_models_s", "cost_wall_score_s", "cost_wall_final_s",
                "cost_wall_s", *REJECTION_COLUMNS]
COLUMNS = [*CELL, "detector", "detector_type", "defender_model", "defender_arch", "arch", "remedy", "defense_params", "r_reject", "alpha", "attack", "target", "asr", "asr_boosted", "asr_paper",
           "auroc_attack", "recall_attack", *CELL_COLUMNS, "defense_budget", "attack_budget"]
REQUIRED = ("dataset", "scenario", "seed", "defense", "detector", "remedy", "attacks", "targets",
            "clean_accuracy", "asr", "mean_asr", "mean_asr_boosted", "n_train", "n_poisoned", "n_removed")


# ---------------------------------------------------------------- collect

def _need(d: dict, key: str, path, where: str = ""):
    if not isinstance(d, dict) or key not in d:
        raise ArtifactError(f"{path}: metrics file lacks required key '{where}{key}'; rerun the evaluate stage for this cell")
    return d[key]


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _cell_rows(path) -> list[dict]:
    m = read_json(path)
    for k in REQUIRED:
        _need(m, k, path)
    # A file copied into the wrong cell directory would silently mislabel a row: check the layout when it is ours.
    from .. import paths

    w = paths.parse("metrics", Path(path).as_posix())
    if w is not None:
        want = [w["dataset"], w["scenario"], w["seed"], w["defense"]]
        got = [m["dataset"], m["scenario"], int(m["seed"]), m["defense"]]
        if [str(x) for x in want] != [str(x) for x in got]:
            raise ArtifactError(f"{path}: metrics say cell {got} but the path says {want}")
    det = m.get("detection")
    if det is not None:
        for k in ("auroc", "recall_removed", "precision_removed"):
            _need(det, k, path, "detection.")
    det = det or {}
    boosted = m.get("asr_boosted") or {}
    wall = [v for v in (m.get("wall_time_s") or {}).values() if v is not None]
    cell = {"dataset": m["dataset"], "scenario": m["scenario"], "seed": int(m["seed"]), "defense": m["defense"],
            "detector": m["detector"], "remedy": m["remedy"], "detector_type": m.get("detector_type"),
            "defender_model": (m.get("defender_model") or {}).get("model_name"),
            "defender_arch": (m.get("defender_model") or {}).get("model"), "arch": m.get("arch"),
            "n_ascent": int(m.get("n_ascent") or 0),
            "r_reject": _num((m.get("defense_params") or {}).get("r_reject")),
            "alpha": _num((m.get("defense_params") or {}).get("alpha")),
            "defense_params": json.dumps({k: v for k, v in sorted((m.get("defense_params") or {}).items())
                                          if k not in ("scenarios", "datasets")}, default=str),
            "clean_accuracy": _num(m["clean_accuracy"]), "mean_asr": _num(m["mean_asr"]),
            "mean_asr_boosted": _num(m["mean_asr_boosted"]), "auroc": _num(det.get("auroc")),
            "recall_removed": _num(det.get("recall_removed")), "precision_removed": _num(det.get("precision_removed")),
            "n_train": int(m["n_train"]), "n_poisoned": int(m["n_poisoned"]), "n_removed": int(m["n_removed"]),
            "wall_time_total_s": float(sum(wall)) if wall else math.nan, **_cost(m.get("cost")),
            **class_rejection(m.get("rejection")), "defense_budget": (m.get("budget") or {}).get("defense")}
    attack_budget = (m.get("budget") or {}).get("attacks") or {}
    rows = []
    if not m["attacks"]:  # the clean scenario: one row, no attack
        return [{**cell, "attack": None, "target": -1, "asr": math.nan, "asr_boosted": math.nan, "asr_paper": math.nan,
                 "auroc_attack": math.nan, "recall_attack": math.nan, "attack_budget": None}]
    for a in m["attacks"]:
        asr, b = _num(_need(m["asr"], a, path, "asr.")), _num(boosted.get(a))
        rows.append({**cell, "attack": a, "target": int(_need(m["targets"], a, path, "targets.")), "asr": asr,
                     "asr_boosted": b, "asr_paper": asr if math.isnan(b) else b,
                     "auroc_attack": _num((det.get("auroc_per_attack") or {}).get(a)),
                     "recall_attack": _num((det.get("recall_per_attack") or {}).get(a)), "attack_budget": attack_budget.get(a)})
    return rows


def _cost(c: dict | None) -> dict:
    """A defense's cost (stages.training_cost) as flat columns; NaN where the metrics predate it."""
    if not c:
        return {}
    models = (c.get("defender_models") or {}).values()
    final = c.get("final_training") or {}
    return {"cost_epochs_models": float(sum(_num(v.get("epochs")) for v in models)),
            "cost_epochs_final": _num(final.get("epochs")) if final else 0.0, "cost_epochs": _num(c.get("epochs")),
            "cost_wall_models_s": float(sum(_num(v.get("wall_time_s")) for v in models)),
            "cost_wall_score_s": _num(c.get("score_wall_time_s")) if c.get("score_wall_time_s") is not None else 0.0,
            "cost_wall_final_s": _num(final.get("wall_time_s")) if final else 0.0, "cost_wall_s": _num(c.get("wall_time_s"))}


def class_rejection(rejection: dict | None, fraction: float = TAIL_FRACTION) -> dict:
    """REJECTION_COLUMNS of one cell from its metrics' `rejection` counts (stages.rejection_counts):
    classes ranked by training-set size (ties: lower class index first), round(fraction x classes)
    of them (at least 1) at each end; a tail's rate is the mean of its classes' clean rejection rates.
    Empty where the metrics predate the counts."""
    if not rejection:
        return {}
    counts = sorted(((int(c), *map(int, v)) for c, v in rejection["by_class"].items()), key=lambda r: (-r[1], r[0]))
    k = max(1, round(fraction * len(counts)))

    def rate(rows) -> float:
        rates = [rej / clean for _, _, clean, rej in rows if clean > 0]
        return float(np.mean(rates)) if rates else math.nan

    clean = sum(r[2] for r in counts)
    n_p, rej_p = rejection["poisoned"]
    top, bottom = counts[:k], sorted(counts, key=lambda r: (r[1], r[0]))[:k]
    return {"clean_rejected": sum(r[3] for r in counts) / clean if clean else math.nan,
            "clean_rejected_top": rate(top), "clean_rejected_bottom": rate(bottom),
            "poisoned_rejected": rej_p / n_p if n_p else math.nan, "n_classes": len(counts), "tail_classes": k,
            "size_top": float(np.mean([r[1] for r in top])), "size_bottom": float(np.mean([r[1] for r in bottom]))}


def collect(metrics_paths: Iterable) -> pd.DataFrame:
    """One row per (dataset, scenario, seed, defense, attack); cell-level values repeat on each attack row."""
    rows, seen = [], {}
    for p in metrics_paths:
        r = _cell_rows(p)
        if r:
            key = tuple(r[0][k] for k in CELL)
            if key in seen:
                raise ArtifactError(f"{p}: cell {key} already read from {seen[key]}")
            seen[key] = p
        rows += r
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype({"seed": "int64", "target": "int64", "n_train": "int64", "n_poisoned": "int64",
                      "n_removed": "int64", "n_ascent": "int64"})


def write_summary(df: pd.DataFrame, out_dir) -> list[Path]:
    out = Path(out_dir)
    csv, parquet = out / "summary.csv", out / "summary.parquet"
    with atomic_path(csv) as tmp:
        df.to_csv(tmp, index=False)
    write_table(parquet, pa.Table.from_pandas(df, preserve_index=False), "summary")
    return [csv, parquet]


# ---------------------------------------------------------------- seed statistics

STAT_KEYS = ["dataset", "scenario", "defense", "attack"]
STAT_METRICS = ["clean_accuracy", "asr", "asr_boosted", "asr_paper", "mean_asr", "mean_asr_boosted", "auroc",
                "recall_removed"]


def seed_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof=1) and n over seeds per (dataset, scenario, defense, attack) for every
    metric; std is NaN with one seed. Cell-level metrics repeat once per seed on each attack row."""
    g = df.groupby(STAT_KEYS, sort=False, dropna=False)
    out = g["seed"].nunique().rename("n").to_frame()
    for m in STAT_METRICS:
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_std"] = g[m].std(ddof=1)
    return out.reset_index()


def write_stats(df: pd.DataFrame, out_dir) -> list[Path]:
    path = Path(out_dir) / "summary_stats.csv"
    with atomic_path(path) as tmp:
        seed_stats(df).to_csv(tmp, index=False)
    return [path]


# ---------------------------------------------------------------- views the tables and figures share

def cell_level(df: pd.DataFrame) -> pd.DataFrame:
    # Cell-level columns repeat on every attack row; aggregate them once per cell so std is over seeds only.
    return df.drop_duplicates(CELL)


def single_vs_multi(g: pd.DataFrame) -> pd.DataFrame:
    """Per defense and attack: the attack's ASR (paper convention) alone (single-<attack>) and in
    the multi-attack scenario, over seeds; only pairs where both ran."""
    rows = []
    for (d, a), ga in g.groupby(["defense", "attack"], sort=False):
        single, multi = ga[ga["scenario"] == f"single-{a}"], ga[ga["scenario"] == "multi"]
        if len(single) and len(multi):
            rows.append({"defense": d, "attack": a, "single": single["asr_paper"].dropna(),
                         "multi": multi["asr_paper"].dropna()})
    return pd.DataFrame(rows)
