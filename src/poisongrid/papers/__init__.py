"""The papers' reported numbers beside a grid's measured ones.

numbers.csv holds every cell of the tables the presets reproduce (BaDLoss Tables 1-5 and Appendix
G, LfD Table 2 and the averages its text states), one row each: the paper, table, row and column
as printed, the preset that reproduces it, the grid cell it belongs to (dataset, scenario,
defense, attack, architecture), the metric and the value in percent. README.md in this folder
says where each comes from and what was ambiguous. A grid names its set with `paper_numbers`
(the preset's name); the aggregate then puts every paper value it has a measured cell for beside
that cell, with the difference, and marks the cells further off than the seed spread plus
OFF_MARGIN points."""
from __future__ import annotations

import csv
import math
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

# pandas is imported where a comparison is made: validating a config only lists the presets.

OFF_MARGIN = 5.0  # points beyond the seed spread that make a cell "off"
OFF_MARK = "‼"
# Which summary column holds what each paper reports. The BaDLoss paper reports blended triggers
# boosted 2x (asr_paper, mean_asr_boosted); LfD the plain trigger.
ASR_COLUMN = {"badloss": "asr_paper", "lfd": "asr"}
MEAN_ASR_COLUMN = {"badloss": "mean_asr_boosted", "lfd": "mean_asr"}
CELL_METRICS = ("clean_accuracy", "clean_rejected", "clean_rejected_top", "clean_rejected_bottom", "poisoned_rejected")


def _file():
    return resources.files(__package__).joinpath("numbers.csv")


def load() -> pd.DataFrame:
    """Every transcribed number (numbers.csv); `preset` without its .yaml suffix."""
    import pandas as pd

    with _file().open(encoding="utf-8") as fh:
        d = pd.read_csv(fh, dtype={"scenario": "string", "attack": "string", "arch": "string", "note": "string"})
    d["preset"] = d["preset"].str.removesuffix(".yaml")
    return d


def presets() -> list[str]:
    """The names a grid's `paper_numbers` may take."""
    with _file().open(encoding="utf-8", newline="") as fh:
        return sorted({r["preset"].removesuffix(".yaml") for r in csv.DictReader(fh)})


def _per_seed(g: pd.DataFrame, column: str) -> pd.Series:
    """One value per seed: cell-level columns repeat on each attack row."""
    return g.drop_duplicates(["seed"])[column] if column in CELL_METRICS or column.startswith("mean_") \
        else g.groupby("seed")[column].mean()


def measured(df: pd.DataFrame, row) -> pd.Series:
    """Our value of one paper cell, one per seed, as a fraction (empty where the grid lacks it)."""
    import pandas as pd

    g = df[(df["dataset"] == row.dataset) & (df["defense"] == row.defense)]
    if isinstance(row.arch, str) and "arch" in g and g["arch"].notna().any():
        g = g[g["arch"] == row.arch]
    asr = ASR_COLUMN.get(row.paper, "asr_paper")
    if isinstance(row.scenario, str):
        g = g[g["scenario"] == row.scenario]
        if g.empty:
            return pd.Series(dtype=float)
        if row.metric == "asr":
            return _per_seed(g[g["attack"] == row.attack], asr) if isinstance(row.attack, str) else pd.Series(dtype=float)
        if row.metric == "mean_asr":
            return _per_seed(g, MEAN_ASR_COLUMN.get(row.paper, "mean_asr_boosted"))
        if row.metric in CELL_METRICS:
            return _per_seed(g, row.metric)
        return pd.Series(dtype=float)
    # An average over the single-attack scenarios (Table 1's last columns, LfD's text): per seed
    # over the attacks each ran alone, then over seeds.
    singles = g[g["scenario"] == "single-" + g["attack"].fillna("")]
    if singles.empty:
        return pd.Series(dtype=float)
    if row.metric == "mean_asr":
        return singles.groupby("seed")[asr].mean()
    if row.metric == "mean_clean_accuracy":
        return singles.drop_duplicates(["seed", "scenario"]).groupby("seed")["clean_accuracy"].mean()
    return pd.Series(dtype=float)


def compare(df: pd.DataFrame, preset: str) -> pd.DataFrame:
    """One row per paper cell the grid measured: ours (mean over seeds) and its sample std, n,
    the paper's value, the difference (points) and whether it is off (|diff| > std + OFF_MARGIN)."""
    import pandas as pd

    paper = load()
    paper = paper[paper["preset"] == preset]
    rows = []
    for r in paper.itertuples(index=False):
        v = measured(df, r).dropna() * 100
        if v.empty:
            continue
        std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        diff = float(v.mean()) - float(r.value)
        rows.append({"paper": r.paper, "table": r.table, "row": r.row, "column": r.column, "dataset": r.dataset,
                     "scenario": r.scenario if isinstance(r.scenario, str) else "", "defense": r.defense,
                     "attack": r.attack if isinstance(r.attack, str) else "", "metric": r.metric, "ours": float(v.mean()),
                     "std": std, "n": int(len(v)), "paper_value": float(r.value), "diff": diff,
                     "off": abs(diff) > std + OFF_MARGIN})
    return pd.DataFrame(rows)


def _fmt(v: float) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def tables(cmp: pd.DataFrame) -> list[str]:
    """Markdown: one table per paper table, in the paper's row and column order."""
    if cmp.empty:
        return []
    out = []
    for (paper, table), g in cmp.groupby(["paper", "table"], sort=False):
        n_off = int(g["off"].sum())
        rows = [[r.row, r.column, r.dataset, r.scenario or "(average)", r.defense,
                 _fmt(r.ours) + (f" ± {r.std:.2f}" if r.n > 1 else ""), str(r.n), _fmt(r.paper_value),
                 f"{r.diff:+.2f}" + (f" {OFF_MARK}" if r.off else "")] for r in g.itertuples()]
        out += [f"### {'BaDLoss' if paper == 'badloss' else 'LfD'} paper, {table}: its numbers beside ours", "",
                f"Each cell of the paper's {table} that this grid measured, in percent: ours (mean ± sample std over n "
                f"seeds), the paper's, and the difference; {OFF_MARK} marks the {n_off} of {len(g)} cells further off "
                f"than the seed spread plus {OFF_MARGIN:g} points. Row and column as printed in the paper "
                "(src/poisongrid/papers/numbers.csv).", "",
                "| Paper row | Paper column | Dataset | Scenario | Defense | Ours | n | Paper | Δ |",
                "|---|---|---|---|---|---:|---:|---:|---:|",
                *["| " + " | ".join(r) + " |" for r in rows], ""]
    return out


def summary(cmp: pd.DataFrame) -> dict:
    """How far off the grid is, overall: cells compared, cells off, mean absolute difference."""
    if cmp.empty:
        return {"cells": 0, "off": 0, "mean_abs_diff": math.nan}
    return {"cells": int(len(cmp)), "off": int(cmp["off"].sum()), "mean_abs_diff": float(cmp["diff"].abs().mean())}
