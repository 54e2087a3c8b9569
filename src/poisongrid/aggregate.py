"""Aggregate grid cells into a tidy summary, Markdown tables (paper Table 2 shape) and figures (Fig. 2/5-6/7/9)."""
from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from .config import capacity_swept, figure_name, model_of_path, swept_detectors
from .errors import ArtifactError
from .io import atomic_path, read_json, read_table, table_meta, write_table
from .poisoning import SEP, attack_names

ATTACK_NAMES = {"patch": "Patch", "single_pixel": "Single-Pix", "blend_random": "Blend-R",
                "blend_pattern": "Blend-P", "sinusoid": "Sinusoid", "narcissus": "Narcissus", "frequency": "Freq",
                "badnets_white": "BN-W", "badnets_grid": "BN-G", "sig": "SIG", "trojan_square": "TJ-SQ", "trojan_watermark": "TJ-WM",
                "l2_invisible": "L2", "label_consistent": "CL", "dynamic": "Dynamic"}
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
DAGGER_NOTE = ("† ASR measured with the blended trigger boosted 2× at test time (the paper's convention, after "
               "Zeng et al. 2022b); Avg. ASR boosted uses these values, Avg. ASR plain the plain trigger for every "
               "attack. Plain-trigger ASR per attack is in the per-dataset plain-trigger table.")
GAP_NOTE = ("‡ the boosted-trigger ASR is more than 20 points below the plain trigger's (means over seeds; plain "
            "value in brackets): boosting breaks this trigger, so the boosted number understates the attack.")
ATTACK_LINE_COLORS = ["tab:red", "tab:orange", "tab:purple", "tab:blue", "tab:brown", "tab:pink", "tab:olive",
                      "tab:cyan"]


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
    from . import paths

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

# Boosted-trigger ASR (the headline, paper convention) more than this far below the plain
# trigger's ASR means the headline understates the attack: such cells get a ‡ and the plain value.
BOOST_GAP = 0.20
STAT_KEYS = ["dataset", "scenario", "defense", "attack"]
STAT_METRICS = ["clean_accuracy", "asr", "asr_boosted", "asr_paper", "mean_asr", "mean_asr_boosted", "auroc",
                "recall_removed"]
# Table files, one per analysis, for the report's sections; tables.md / tables.html hold them all.
TABLE_SECTIONS = {"papers": "the papers' numbers beside ours",
                  "multi": "multi-attack results (the BaDLoss paper's Table 2 shape)",
                  "single": "single-attack results (the BaDLoss paper's Table 1 shape) and each single scenario",
                  "singlemulti": "each attack alone vs in the multi-attack scenario (the paper's Fig. 10)",
                  "cost": "the cost of each defense",
                  "rejection": "clean examples rejected in large and small classes (the paper's Appendix G)"}
SECTION_EMPTY = {"papers": "This grid names no paper's numbers to compare with (paper_numbers), or measured none of their cells.",
                 "multi": "This grid has no multi-attack scenario.",
                 "single": "This grid has no single-attack or clean scenario.",
                 "singlemulti": "No attack ran both alone (single-<attack>) and in the multi scenario under one defense.",
                 "cost": "No cell of this grid has a cost record (metrics from before cost was recorded).",
                 "rejection": "No defense of this grid removes examples (or its metrics predate the per-class counts)."}


def table_section_name(kind: str) -> str:
    return f"tables_{kind}.html"


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


# ---------------------------------------------------------------- ordering and formatting

# The figures' group of examples that several attacks share (datasets with `overlap: true`).
SHARED = "several attacks"


def _attack_groups(attack_col: pd.Series) -> tuple[list[str], np.ndarray]:
    """The attacks of a manifest's `attack` column in paper order, and which rows carry several
    (those go to their own group; each attack's group holds the rows carrying it alone)."""
    shared = attack_col.fillna("").str.contains(SEP, regex=False).to_numpy(bool)
    return attack_order(attack_names(attack_col)), shared


def attack_order(attacks: Iterable[str]) -> list[str]:
    """Paper order (Fig. 3) for known attacks, then any others in order of appearance."""
    seen = list(dict.fromkeys(a for a in attacks if isinstance(a, str)))  # the clean scenario's rows have none
    known = [a for a in ATTACK_NAMES if a in seen]
    return known + [a for a in seen if a not in ATTACK_NAMES]


def defense_order(df: pd.DataFrame) -> list[str]:
    """Per final-model architecture (the `none` defense's first, then by first appearance): no-defense
    baseline first; then grouped by detector (first appearance), by r_reject within a group."""
    cells = (df.drop_duplicates("defense")
             .assign(detector=lambda c: c["detector"].fillna(""), arch=lambda c: c["arch"].fillna("")))  # NaN != NaN as a key
    det_rank = {d: i for i, d in enumerate(dict.fromkeys(cells["detector"]))}
    base = cells.loc[cells["defense"] == "none", "arch"].tolist()
    arch_rank = {a: i for i, a in enumerate(dict.fromkeys(base + cells["arch"].tolist()))}
    key = {r.defense: (arch_rank[r.arch], r.defense != "none" and r.remedy != "none", det_rank[r.detector],
                       -1.0 if math.isnan(r.r_reject) else r.r_reject, i)
           for i, r in enumerate(cells.itertuples())}
    return sorted(key, key=key.get)


def _label(attack: str, dagger: bool = False) -> str:
    return ATTACK_NAMES.get(attack, attack) + ("†" if dagger else "")


def _pct(values, n: int | None = None) -> str:
    """Mean ± sample std (ddof=1) over seeds in percent; one seed: the value alone (no ± 0).
    n: the row's seed count; a cell with fewer values says how many it has."""
    v = pd.Series(values, dtype=float).dropna() * 100
    if v.empty:
        return "–"
    s = f"{v.mean():.2f}" if len(v) == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"
    return s + (f" (n={len(v)})" if n is not None and len(v) != n else "")


def understated(plain, boosted) -> bool:
    """The boosted (headline) ASR is more than BOOST_GAP below the plain one, on the means over seeds."""
    p, b = pd.Series(plain, dtype=float).dropna(), pd.Series(boosted, dtype=float).dropna()
    return not p.empty and not b.empty and b.mean() < p.mean() - BOOST_GAP


def _asr_cell(rows: pd.DataFrame, n: int | None) -> tuple[str, bool]:
    """The paper-convention ASR of one attack over seeds; ‡ and the plain value when boosting understates it."""
    s = _pct(rows["asr_paper"], n)
    if understated(rows["asr"], rows["asr_boosted"]):
        return f"{s}‡ (plain {rows['asr'].dropna().mean() * 100:.2f})", True
    return s, False


def _md_table(header: list[str], rows: list[list[str]], text_cols: int = 1) -> list[str]:
    align = ["---"] * text_cols + ["---:"] * (len(header) - text_cols)  # names left, numbers right
    return ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
           *["| " + " | ".join(r) + " |" for r in rows]]


def _cells(df: pd.DataFrame) -> pd.DataFrame:
    # Cell-level columns repeat on every attack row; aggregate them once per cell so std is over seeds only.
    return df.drop_duplicates(CELL)


def _seeds_note(df: pd.DataFrame) -> str:
    n = df["seed"].nunique()
    if n == 1:
        return "n=1 seed: single values, no spread"
    return f"{n} seeds, mean ± sample std over seeds; n = seeds in the row"


def _n(df: pd.DataFrame) -> int:
    return int(df["seed"].nunique())


def _footnotes(boosted: bool, gap: bool) -> list[str]:
    return (["", DAGGER_NOTE] if boosted else []) + (["", GAP_NOTE] if gap else [])


def _avg_columns(boosted: bool) -> list[str]:
    return ["Avg. ASR plain", "Avg. ASR boosted†"] if boosted else ["Avg. ASR"]


def _avg_cells(cells: pd.DataFrame, boosted: bool, n: int) -> list[str]:
    if not boosted:
        return [_pct(cells["mean_asr"], n)]
    b = _pct(cells["mean_asr_boosted"], n)
    return [_pct(cells["mean_asr"], n), b + ("‡" if understated(cells["mean_asr"], cells["mean_asr_boosted"]) else "")]


def scenario_table(g: pd.DataFrame, ds: str, sc: str) -> list[str]:
    """One dataset and scenario in the paper's Table 2 shape: clean accuracy, ASR per attack (paper
    convention), Avg. ASR plain and boosted, and the detector's AUROC and recall where it has one."""
    attacks = attack_order(g["attack"])
    boosted = g["asr_boosted"].notna().any()
    boosted_attacks = set(g.loc[g["asr_boosted"].notna(), "attack"])
    detects = g["auroc"].notna().any() or g["recall_removed"].notna().any()
    # Several final-model architectures (the paper's Table 5): each row names its own.
    archs = g["arch"].nunique() > 1
    header = ["Defense", *(["Arch."] if archs else []), "n", "Clean Acc.", *[_label(a, a in boosted_attacks) for a in attacks]]
    header += (_avg_columns(boosted) if attacks else []) + (["AUROC", "Recall (removed)"] if detects else [])
    rows, gap = [], False
    for d in defense_order(g):
        gd = g[g["defense"] == d]
        cd, n = _cells(gd), _n(gd)
        row = [d, *([str(cd["arch"].iloc[0])] if archs else []), str(n), _pct(cd["clean_accuracy"], n)]
        for a in attacks:
            text, flag = _asr_cell(gd[gd["attack"] == a], n)
            row.append(text)
            gap |= flag
        if attacks:
            avg = _avg_cells(cd, boosted, n)
            gap |= avg[-1].endswith("‡")
            row += avg
        rows.append(row + ([_pct(cd["auroc"], n), _pct(cd["recall_removed"], n)] if detects else []))
    return [f"### {ds} — {sc}", "", f"All numbers in percent ({_seeds_note(g)}).", "", *_md_table(header, rows, 3 if archs else 2),
            *_footnotes(bool(boosted_attacks), gap), ""]


def single_attack_table(g: pd.DataFrame) -> list[str]:
    """The BaDLoss paper's Table 1 shape: per defense, each attack's ASR when it is the only attack
    (its single-<attack> scenario), the mean clean accuracy over those scenarios and the Avg. ASR.
    Averages are taken per seed first (over the attacks a seed has all of), then over seeds."""
    singles = [a for a in attack_order(g["attack"]) if f"single-{a}" in set(g["scenario"])]
    if not singles:
        return []
    rows_of = g[g["scenario"].isin([f"single-{a}" for a in singles])]
    rows_of = rows_of[rows_of["attack"] == rows_of["scenario"].str[len("single-"):]]
    boosted_attacks = set(rows_of.loc[rows_of["asr_boosted"].notna(), "attack"])
    boosted = bool(boosted_attacks)
    header = ["Defense", "n", "Clean Acc. (mean)", *[_label(a, a in boosted_attacks) for a in singles],
              *_avg_columns(boosted)]
    rows, gap = [], False
    for d in defense_order(rows_of):
        gd = rows_of[rows_of["defense"] == d]
        n = _n(gd)
        per_seed = gd.groupby("seed").agg(clean=("clean_accuracy", "mean"), plain=("asr", "mean"),
                                         paper=("asr_paper", "mean"), k=("attack", "nunique"))
        full = per_seed[per_seed["k"] == gd["attack"].nunique()]
        row = [d, str(n), _pct(per_seed["clean"], n)]
        for a in singles:
            ga = gd[gd["attack"] == a]
            text, flag = _asr_cell(ga, n) if len(ga) else ("–", False)
            row.append(text)
            gap |= flag
        if boosted:
            flag = understated(full["plain"], full["paper"])
            row += [_pct(full["plain"], n), _pct(full["paper"], n) + ("‡" if flag else "")]
            gap |= flag
        else:
            row.append(_pct(full["plain"], n))
        rows.append(row)
    ds = g["dataset"].iloc[0]
    return [f"### {ds} — single attack (Table 1 shape)", "",
            "Each attack's ASR when it is the only attack (its single-<attack> scenario); Clean Acc. is the mean over "
            f"those scenarios; in percent ({_seeds_note(rows_of)}).", "", *_md_table(header, rows, 2),
            *_footnotes(boosted, gap), ""]


def plain_table(g: pd.DataFrame) -> list[str]:
    attacks = attack_order(g["attack"])
    if not attacks:
        return []
    rows = []
    for sc, gs in g.groupby("scenario", sort=False):
        if gs["attack"].isna().all():
            continue
        for d in defense_order(gs):
            gd = gs[gs["defense"] == d]
            n = _n(gd)
            rows.append([sc, d, str(n), *[_pct(gd.loc[gd["attack"] == a, "asr"], n) for a in attacks],
                         _pct(_cells(gd)["mean_asr"], n)])
    ds = g["dataset"].iloc[0]
    return [f"### {ds} — plain-trigger ASR", "", f"ASR with the un-boosted test trigger, in percent "
            f"({_seeds_note(g)}).", "", *_md_table(["Scenario", "Defense", "n", *map(_label, attacks), "Avg. ASR"], rows, 3), ""]


def table_sections(df: pd.DataFrame, comparison: pd.DataFrame | None = None) -> dict[str, list[str]]:
    """Markdown of every table, per analysis (TABLE_SECTIONS), datasets in order of appearance;
    `comparison` (papers.compare) gives the papers' section."""
    from . import papers

    out: dict[str, list[str]] = {k: [] for k in TABLE_SECTIONS}
    out["plain"] = []
    out["papers"] = papers.tables(comparison) if comparison is not None else []
    for ds, g in df.groupby("dataset", sort=False):
        scenarios = list(dict.fromkeys(g["scenario"]))
        budget = budget_marks(g)
        if "multi" in scenarios:
            out["multi"] += budget.mark(scenario_table(g[g["scenario"] == "multi"], ds, "multi"))
        out["single"] += budget.mark(single_attack_table(g))
        for sc in scenarios:
            if sc != "multi":
                out["single"] += budget.mark(scenario_table(g[g["scenario"] == sc], ds, sc))
        out["single"] += budget.mark(per_attack_table(g))
        out["singlemulti"] += budget.mark(single_vs_multi_table(g))
        out["plain"] += budget.mark(plain_table(g))
        out["cost"] += budget.mark(cost_table(g))
        out["rejection"] += budget.mark(rejection_table(g))
        out["plain"] += budget.notes(ds)
    return out


def markdown_tables(df: pd.DataFrame, comparison: pd.DataFrame | None = None) -> str:
    s = table_sections(df, comparison)
    return "\n".join(s["papers"] + s["multi"] + s["single"] + s["singlemulti"] + s["plain"] + s["cost"] + s["rejection"])


BUDGET_MARK = "§"


class BudgetMarks:
    """The defenses and attacks of one dataset that ran below their reference's budget (a
    detector's shortened search, a learned attack's shorter training): their names get BUDGET_MARK
    in every table, and a note lists what was cut."""

    def __init__(self, defenses: dict[str, str], attacks: dict[str, str]):
        self.defenses, self.attacks = defenses, attacks
        self.labels = {_label(a): a for a in attacks}

    def _cell(self, text: str, header: bool) -> str:
        base = text.rstrip("†‡")
        tail = text[len(base):]
        if base in self.defenses or base in self.labels:
            return base + BUDGET_MARK + tail
        first, _, rest = text.partition(" ")  # "defense CA" headers of the per-attack table
        if header and rest and first in self.defenses:
            return f"{first}{BUDGET_MARK} {rest}"
        return text

    def mark(self, lines: list[str]) -> list[str]:
        if not (self.defenses or self.attacks):
            return lines
        out = []
        for i, line in enumerate(lines):
            if not line.startswith("|") or line.startswith("|---"):
                out.append(line)
                continue
            header = i + 1 < len(lines) and lines[i + 1].startswith("|---")
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            cells = [self._cell(c, header) if (header or j == 0) else c for j, c in enumerate(cells)]
            out.append("| " + " | ".join(cells) + " |")
        return out

    def notes(self, dataset: str) -> list[str]:
        if not (self.defenses or self.attacks):
            return []
        items = [f"- defense {d}: {n}" for d, n in self.defenses.items()] + \
                [f"- attack {_label(a)}: {n}" for a, n in self.attacks.items()]
        return [f"### {dataset} — {BUDGET_MARK} below the references' budgets", "",
                f"Names marked {BUDGET_MARK} in this dataset's tables ran with less work than their reference code does "
                "(a cheaper setting of this grid's config); their numbers may differ from the reference's for that reason.",
                "", *items, ""]


def budget_marks(g: pd.DataFrame) -> BudgetMarks:
    d = g.dropna(subset=["defense_budget"]).drop_duplicates("defense")
    a = g.dropna(subset=["attack_budget"]).drop_duplicates("attack")
    return BudgetMarks(dict(zip(d["defense"], d["defense_budget"])), dict(zip(a["attack"], a["attack_budget"])))


def per_seed_tables(df: pd.DataFrame) -> str:
    """Every cell's own numbers, one row per defense and seed: what the mean ± std tables aggregate."""
    out = ["Per-seed results in percent: one row per defense and seed, before averaging over seeds. ASR follows "
           "the paper's convention (boosted trigger for † attacks); Avg. ASR plain uses the plain trigger.", ""]
    for (ds, sc), g in df.groupby(["dataset", "scenario"], sort=False):
        attacks = attack_order(g["attack"])
        boosted = set(g.loc[g["asr_boosted"].notna(), "attack"])
        header = ["Defense", "Seed", "Clean Acc.", *[_label(a, a in boosted) for a in attacks]]
        header += ["Avg. ASR plain", "Avg. ASR boosted†"] if attacks else []
        rows = []
        for d in defense_order(g):
            gd = g[g["defense"] == d]
            for seed, gs in gd.groupby("seed", sort=True):
                c = gs.iloc[0]
                row = [d, str(seed), _pct([c["clean_accuracy"]])]
                row += [_pct(gs.loc[gs["attack"] == a, "asr_paper"]) for a in attacks]
                rows.append(row + ([_pct([c["mean_asr"]]), _pct([c["mean_asr_boosted"]])] if attacks else []))
        out += [f"### {ds} — {sc}, per seed", "", *_md_table(header, rows, 2), ""]
    return "\n".join(out)


def _single_vs_multi(g: pd.DataFrame) -> pd.DataFrame:
    """Per defense and attack: the attack's ASR (paper convention) alone (single-<attack>) and in
    the multi-attack scenario, over seeds; only pairs where both ran."""
    rows = []
    for (d, a), ga in g.groupby(["defense", "attack"], sort=False):
        single, multi = ga[ga["scenario"] == f"single-{a}"], ga[ga["scenario"] == "multi"]
        if len(single) and len(multi):
            rows.append({"defense": d, "attack": a, "single": single["asr_paper"].dropna(),
                         "multi": multi["asr_paper"].dropna()})
    return pd.DataFrame(rows)


def single_vs_multi_table(g: pd.DataFrame) -> list[str]:
    """The paper's Fig. 10 as a table: each attack's ASR alone vs with the others, per defense."""
    sm = _single_vs_multi(g)
    if sm.empty:
        return []
    attacks = attack_order(sm["attack"])
    rows = []
    for d in [d for d in defense_order(g) if d in set(sm["defense"])]:
        s = sm[sm["defense"] == d].set_index("attack")
        n = _n(g[(g["defense"] == d) & g["scenario"].isin(["multi", *[f"single-{a}" for a in s.index]])])
        rows.append([d, str(n), *[(f"{_pct(s.loc[a, 'single'], n)} / {_pct(s.loc[a, 'multi'], n)}"
                                   if a in s.index else "–") for a in attacks]])
    return [f"### {g['dataset'].iloc[0]} — single vs multi-attack ASR", "",
            "ASR of each attack trained alone / with all the others at once (the multi scenario), in percent "
            f"({_seeds_note(g)}); blended triggers boosted as in the main table (the paper's Fig. 10).", "",
            *_md_table(["Defense", "n", *map(_label, attacks)], rows, 2), ""]


def per_attack_table(g: pd.DataFrame) -> list[str]:
    """The LfD paper's Table 2 shape: one row per attack run alone (its single scenario) and one
    for no attack (the clean scenario), clean accuracy and ASR per defense. Drawn when the
    dataset has the clean scenario."""
    if "clean" not in set(g["scenario"]):
        return []
    singles = [a for a in attack_order(g["attack"]) if f"single-{a}" in set(g["scenario"])]
    scen = ["clean"] + [f"single-{a}" for a in singles]
    gs = g[g["scenario"].isin(scen)]
    defenses = defense_order(gs)
    header = ["Attack", "n", *[f"{d} {k}" for d in defenses for k in ("CA", "ASR")]]
    rows = []
    for sc in scen:
        n = _n(gs[gs["scenario"] == sc])
        row = ["No attack" if sc == "clean" else _label(sc[len("single-"):]), str(n)]
        for d in defenses:
            c = gs[(gs["scenario"] == sc) & (gs["defense"] == d)]
            row += [_pct(_cells(c)["clean_accuracy"], n), "–" if sc == "clean" else _pct(c["asr_paper"], n)]
        rows.append(row)
    return [f"### {g['dataset'].iloc[0]} — per attack (LfD Table 2 shape)", "",
            "Each attack alone (its single scenario) and no attack (the clean scenario): clean accuracy (CA) and "
            f"attack success rate (ASR) per defense, in percent ({_seeds_note(gs)}).", "", *_md_table(header, rows, 2), ""]


def _minutes(v: pd.Series) -> str:
    v = v.dropna() / 60
    if v.empty:
        return "–"
    return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def _epochs(v: pd.Series) -> str:
    v = v.dropna()
    return "–" if v.empty else f"{v.mean():g}"


def cost_table(g: pd.DataFrame) -> list[str]:
    """Each defense's cost (the paper's Appendix C.2): epochs of training of the defender models it
    read and of its final training, and wall time of each part, per cell over all scenarios."""
    cells = _cells(g)
    if "cost_epochs" not in cells or cells["cost_epochs"].isna().all():
        return []
    rows = []
    for d in defense_order(g):
        c = cells[cells["defense"] == d]
        n_cells = int(c["cost_epochs"].notna().sum())
        rows.append([d, str(n_cells), _epochs(c["cost_epochs_models"]), _epochs(c["cost_epochs_final"]), _epochs(c["cost_epochs"]),
                     _minutes(c["cost_wall_models_s"]), _minutes(c["cost_wall_score_s"]), _minutes(c["cost_wall_final_s"]),
                     _minutes(c["cost_wall_s"])])
    return [f"### {g['dataset'].iloc[0]} — cost of each defense", "",
            "Epochs of training (defender models it reads, e.g. the attacked model or a pretraining run, each counted "
            "once; and its own final training) and wall time in minutes: mean (± sample std where more than one) over "
            f"the cells with a cost record, counted in Cells ({cells['scenario'].nunique()} scenarios × "
            f"{cells['seed'].nunique()} seeds at most). Scoring includes any optimisation a "
            "detector does itself (trigger reverse-engineering, masks, its own classifier).", "",
            *_md_table(["Defense", "Cells", "Model epochs", "Final epochs", "Total epochs", "Models (min)", "Scoring (min)",
                        "Final (min)", "Total (min)"], rows), ""]


def rejection_table(g: pd.DataFrame) -> list[str]:
    """Per scenario, each defense that removes examples: the share of clean examples its plan
    rejected, overall and in the largest and smallest 10% of classes, and of poisoned examples
    (the paper's Appendix G)."""
    cells = _cells(g)
    if "clean_rejected" not in cells or cells["clean_rejected"].isna().all():
        return []
    out = []
    for sc, gs in cells.groupby("scenario", sort=False):
        removing = [d for d in defense_order(gs) if (gs.loc[gs["defense"] == d, "n_removed"] > 0).any()]
        c0 = gs[gs["clean_rejected"].notna()]
        if not removing or c0.empty:
            continue
        k, top, bottom = int(c0["tail_classes"].iloc[0]), c0["size_top"].mean(), c0["size_bottom"].mean()
        n_classes = int(c0["n_classes"].iloc[0])
        rows = []
        for d in removing:
            c = gs[gs["defense"] == d]
            n = _n(c)
            rows.append([d, str(n), _pct(c["n_removed"] / c["n_train"], n), _pct(c["clean_rejected"], n),
                         _pct(c["clean_rejected_top"], n), _pct(c["clean_rejected_bottom"], n), _pct(c["poisoned_rejected"], n)])
        ds = g["dataset"].iloc[0]
        out += [f"### {ds} — {sc}: rejection by class size", "",
                f"Share of examples each defense's plan rejects (weight 0), in percent ({_seeds_note(c0)}): of all "
                f"training examples, of the clean (untouched) ones, of the clean ones of the largest and the smallest "
                f"{k} of {n_classes} classes by training-set size (mean over those classes; "
                f"{top:.0f} and {bottom:.0f} examples per class on average), and of the poisoned ones. The BaDLoss "
                "paper's Appendix G, GTSRB multi-attack: 25.5% (largest 10%) vs 52.5% (smallest 10%) of clean "
                "examples rejected, 95.1% of poisoned ones.", "",
                *_md_table(["Defense", "n", "Removed", "Clean rejected", f"Largest {k} classes", f"Smallest {k} classes",
                            "Poisoned rejected"], rows), ""]
    return out


TABLES_CSS = """body { font-family: sans-serif; font-size: 14px; margin: 1em; color: #222; }
h3 { margin: 1.6em 0 0.4em; font-size: 1.1em; }
table { border-collapse: collapse; margin: 0.4em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; white-space: nowrap; }
th { background: #f2f2f2; }
tbody tr:nth-child(even) { background: #fafafa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
p { margin: 0.3em 0; max-width: 60em; }"""


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def html_tables(markdown: str, title: str = "poisongrid summary tables") -> str:
    """A standalone HTML page of markdown_tables' output (### headings, paragraphs and pipe tables only).

    For viewers that do not render Markdown, e.g. the Snakemake report, which shows an HTML file inline.
    """
    out = ["<!DOCTYPE html>", '<html lang="en">', '<head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>\n{TABLES_CSS}\n</style>", "</head>", "<body>"]
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("### "):
            out.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(?:\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            # Right-aligned (---:) columns hold numbers.
            cls = ["" if not c.endswith(":") else ' class="num"' for c in _md_cells(lines[i + 1])]

            def row(cells_line: str, tag: str) -> str:
                cells = _md_cells(cells_line)
                return "<tr>" + "".join(f"<{tag}{cls[j] if j < len(cls) else ''}>{html.escape(c)}</{tag}>"
                                        for j, c in enumerate(cells)) + "</tr>"

            out += ["<table>", "<thead>" + row(line, "th") + "</thead>", "<tbody>"]
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                out.append(row(lines[i], "td"))
                i += 1
            out += ["</tbody>", "</table>"]
            continue
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(out + ["</body>", "</html>", ""])


# ---------------------------------------------------------------- figures

def _figure(**kw):
    """A bare matplotlib Figure, never through pyplot: no global figure registry to leak into (so
    nothing to forget to close) and no dependence on whichever backend the calling process chose
    (_save draws it on an Agg canvas). matplotlib is imported here: the tables need none of it."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def _save(fig, path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        # bbox_inches="tight" grows the canvas to whatever sticks out (suptitles, outside legends) instead of clipping it.
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", pad_inches=0.15)  # tmp has a .tmp suffix: name the format
    return Path(path)


def _spread_title(title: str, df: pd.DataFrame) -> str:
    """The title plus what the bars and error bars are; n is the most seeds any point has (the
    tables give each row's n)."""
    per = df.groupby(["scenario", "defense"])["seed"].nunique()
    n = int(per.max())
    if n == 1:
        return f"{title}\n(n=1 seed, no spread)"
    return f"{title}\n(mean ± sample std over n{'=' if per.min() == n else ' ≤ '}{n} seeds)"


def _pct_top(values: Iterable[float]) -> float:
    """A y limit in percent that fits the data (bars plus error bars) with headroom, within 0-105."""
    v = [x for x in values if x is not None and np.isfinite(x)]
    return min(105.0, max(10.0, 1.12 * max(v, default=0.0)))


def asr_figure(df: pd.DataFrame, out_path, title: str) -> Path:
    """Grouped bars: ASR (paper convention) per attack, one bar per defense (paper Fig. 5/6); with
    several seeds the bar is the mean and the error bar the sample std."""
    import seaborn as sns

    attacks, defenses = attack_order(df["attack"]), defense_order(df)
    boosted = set(df.loc[df["asr_boosted"].notna(), "attack"])
    data = df.assign(ASR=df["asr_paper"] * 100, Attack=[_label(a, a in boosted) for a in df["attack"]])
    stats = data.groupby(["Attack", "defense"])["ASR"].agg(["mean", "std"]).fillna(0)
    fig = _figure(figsize=(max(6.5, 1.5 + 0.3 * len(attacks) * max(len(defenses), 2)), 4.2))
    ax = fig.add_subplot()
    sns.barplot(data=data, x="Attack", y="ASR", hue="defense", order=[_label(a, a in boosted) for a in attacks],
                hue_order=defenses, errorbar="sd" if df["seed"].nunique() > 1 else None, capsize=0.1, ax=ax)
    ax.set(ylim=(0, _pct_top(stats["mean"] + stats["std"])), ylabel="Attack success rate (%)", xlabel="")
    ax.set_title(_spread_title(title, df))
    ax.legend(title="Defense", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")
    return _save(fig, out_path)


def single_multi_figure(df: pd.DataFrame, out_path, title: str) -> Path | None:
    """Each attack's ASR alone vs in the multi-attack scenario, one panel per defense, one figure per
    dataset (the paper's Fig. 10): bars are means over seeds, error bars the sample std; None when
    no attack ran both alone and in the multi scenario."""
    sm = _single_vs_multi(df)
    if sm.empty:
        return None
    attacks = attack_order(sm["attack"])
    defenses = [d for d in defense_order(df) if d in set(sm["defense"])]
    cols = min(3 if len(attacks) <= 4 else 2, len(defenses))
    rows = -(-len(defenses) // cols)
    panel_w = max(3.4, 1.0 + 0.6 * len(attacks))
    fig = _figure(figsize=(panel_w * cols, 3.3 * rows + 0.6))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, sharey=True)).ravel()
    x = np.arange(len(attacks))
    boosted = set(df.loc[df["asr_boosted"].notna(), "attack"])
    tops = []
    for ax, d in zip(axes, defenses):
        s = sm[sm["defense"] == d].set_index("attack")
        for off, col, color, name in ((-0.2, "single", "tab:orange", "alone"), (0.2, "multi", "tab:red", "multi-attack")):
            vals = [s.loc[a, col] * 100 if a in s.index else pd.Series(dtype=float) for a in attacks]
            mean = [v.mean() if len(v) else np.nan for v in vals]
            std = [v.std(ddof=1) if len(v) > 1 else np.nan for v in vals]  # one seed: no error bar, not a ± 0 one
            ax.bar(x + off, mean, 0.4, yerr=std, color=color, label=name, capsize=3, error_kw={"lw": 1})
            tops += [m + (0.0 if np.isnan(e) else e) for m, e in zip(mean, std)]
        ax.set_xticks(x, [_label(a, a in boosted) for a in attacks], rotation=30 if len(attacks) > 3 else 0,
                      ha="right" if len(attacks) > 3 else "center")
        n = df.loc[(df["defense"] == d) & df["attack"].isin(s.index) &
                   df["scenario"].isin(["multi", *[f"single-{a}" for a in s.index]]), "seed"].nunique()
        ax.set_title(f"{d} (n={n})")
        ax.grid(axis="y", lw=0.5, alpha=0.5)
    for i, ax in enumerate(axes):
        if i % cols == 0:
            ax.set_ylabel("ASR (%)")
    axes[0].set_ylim(0, _pct_top(tops))
    for ax in axes[len(defenses):]:
        ax.set_visible(False)
    # Outside the panels, right of the first row: inside it would cover bars near 100%.
    axes[cols - 1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(_spread_title(title, df))
    return _save(fig, out_path)


def rreject_figure(df: pd.DataFrame, out_path, title: str) -> Path | None:
    """Clean accuracy and Avg. ASR against r_reject per detector (paper Fig. 7); None if no sweep to draw."""
    import seaborn as sns

    cells = _cells(df)
    swept = swept_detectors(cells[["detector", "remedy", "r_reject"]].itertuples(index=False))
    sweep = cells[(cells["remedy"] == "remove") & cells["r_reject"].notna() & cells["detector"].isin(swept)]
    if sweep.empty:
        return None
    base = cells[cells["remedy"] == "none"]
    fig = _figure(figsize=(10, 4.2))
    for ax, col, name in zip(fig.subplots(1, 2), ["clean_accuracy", "mean_asr_boosted"], ["Clean accuracy", "Avg. ASR (boosted†)"]):
        sns.lineplot(data=sweep.assign(y=sweep[col] * 100), x="r_reject", y="y", hue="detector", marker="o",
                     errorbar="sd", err_style="bars", err_kws={"capsize": 3}, ax=ax)
        pts = sweep.groupby(["detector", "r_reject"])[col].agg(["mean", "std"]).fillna(0) * 100
        ys, lows = [*(pts["mean"] + pts["std"])], [*(pts["mean"] - pts["std"])]
        if not base.empty:  # the undefended model has no r_reject: a reference line (± std band), not an r=0 point
            m, sd = base[col].mean() * 100, (base[col].std(ddof=1) * 100 if len(base) > 1 else 0.0)
            ax.axhline(m, ls="--", color="0.4", label="no defense")
            if sd > 0:
                ax.axhspan(m - sd, m + sd, color="0.4", alpha=0.12, lw=0)
            ys.append(m + sd)
            lows.append(m - sd)
        # Clean accuracy lives in a narrow band near the top: zoom to it; ASR from 0 to what the data reach.
        ylim = (max(0.0, min(lows) - 5), min(102.0, max(ys) + 3)) if col == "clean_accuracy" else (0, _pct_top(ys))
        ax.set(xlabel="$r_{reject}$", ylabel=f"{name} (%)", ylim=ylim)
        ax.grid(lw=0.5, alpha=0.5)
        ax.legend(fontsize="small")
    fig.suptitle(_spread_title(title, df))
    return _save(fig, out_path)


def trajectory_figure(trajectories_path, manifest_path, out_path, title: str) -> Path:
    """Mean loss per epoch of clean, bona fide and each attack's examples (paper Fig. 2/9), log scale."""
    pf, meta = table_meta(trajectories_path, "trajectories")
    if "accepted_epochs" not in meta or not meta["accepted_epochs"]:
        raise ArtifactError(f"{trajectories_path}: metadata has no accepted_epochs; rerun pretrain")
    epochs, skipped = list(meta["accepted_epochs"]), list(meta.get("skipped_epochs") or [])
    cols = [f"loss_e{e:03d}" for e in epochs]
    if missing := [c for c in cols if c not in pf.schema_arrow.names]:
        raise ArtifactError(f"{trajectories_path}: accepted epoch columns {missing} are missing; rerun pretrain")
    man = _with_bona_fide(manifest_path)
    attacks, shared = _attack_groups(man["attack"])
    groups = ["clean", "bona fide", *attacks] + ([SHARED] if shared.any() else [])
    # Each example goes to exactly one group; poisoned wins over a (mis-set) bona fide flag.
    code = man["bona_fide"].fillna(False).to_numpy(bool).astype(np.int64)
    for i, a in enumerate(attacks):
        code[(man["attack"] == a).fillna(False).to_numpy(bool)] = i + 2
    code[shared] = len(attacks) + 2
    lookup = np.full(int(man["index"].max()) + 1 if len(man) else 0, -1, dtype=np.int64)
    lookup[man["index"].to_numpy()] = code
    # Stream row groups and keep per-group sums: a trajectories file may be larger than memory.
    sums, counts = np.zeros((len(groups), len(cols))), np.zeros(len(groups))
    try:
        for b in pf.iter_batches(columns=["index", *cols]):
            ix = b.column(0).to_numpy()
            if ix.size and (ix.max() >= len(lookup) or (lookup[ix] < 0).any()):
                raise ArtifactError(f"{trajectories_path}: has example indices missing from {manifest_path}; "
                                    "the two come from different runs")
            g = lookup[ix]
            counts += np.bincount(g, minlength=len(groups))
            for j in range(len(cols)):
                sums[:, j] += np.bincount(g, weights=b.column(j + 1).to_numpy(zero_copy_only=False),
                                          minlength=len(groups))
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(f"{trajectories_path}: Parquet data unreadable ({e}); delete it and rerun pretrain") from None
    fig = _figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    # Bona fide in heavy green as in the paper's Fig. 9; clean drawn over it since the two usually coincide.
    styles = [dict(color="0.35", lw=2, zorder=3), dict(color="green", lw=3.5)] + \
             [dict(color=ATTACK_LINE_COLORS[i % len(ATTACK_LINE_COLORS)], lw=1.5) for i in range(len(attacks))] + \
             [dict(color="k", lw=1.5, ls="--")]
    for i, (name, st) in enumerate(zip(groups, styles)):
        if counts[i]:
            # A group whose mean loss reaches 0 would vanish on a log axis; clip to a tiny positive floor.
            ax.plot(epochs, np.maximum(sums[i] / counts[i], 1e-8), label=f"{_label(name)} (n={int(counts[i])})", **st)
    for k, e in enumerate(skipped):
        ax.axvline(e, ls=":", color="0.5", lw=1, label="skipped epoch" if k == 0 else None)
    ax.set(yscale="log", xlabel="epoch", ylabel="mean training loss", title=title)
    ax.legend(fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    return _save(fig, out_path)


def teacher_figure(losses_path, manifest_path, out_path, title: str, gamma_alpha: float | None = None) -> Path:
    """Distribution of each example's final loss on a teacher, clean vs each attack (LfD Fig. 1-2
    idea), log-x histograms; with gamma_alpha, the threshold gamma (Eq. 4) as a dashed line."""
    pf, meta = table_meta(losses_path, "trajectories")
    col = f"loss_e{meta['epochs_recorded'] - 1:03d}"
    loss = read_table(losses_path, "trajectories", columns=["index", col])[0].to_pandas()
    man = read_table(manifest_path, "manifest", columns=["index", "attack"])[0].to_pandas()
    df = loss.merge(man, on="index", how="left", validate="one_to_one")
    if len(loss) != len(man) or not np.array_equal(np.sort(loss["index"].to_numpy()), np.sort(man["index"].to_numpy())):
        raise ArtifactError(f"{losses_path}: examples differ from {manifest_path}; the two come from different runs")
    attacks, shared = _attack_groups(df["attack"])
    v = np.maximum(df[col].to_numpy(np.float64), 1e-8)
    bins = np.logspace(np.log10(v.min()), np.log10(max(v.max(), v.min() * 10)), 40)
    fig = _figure(figsize=(7.5, 4.2))
    ax = fig.add_subplot()
    groups = [("clean", df["attack"].isna().to_numpy())] + [(a, (df["attack"] == a).fillna(False).to_numpy(bool)) for a in attacks] + \
             [(SHARED, shared)]
    for i, (name, m) in enumerate(groups):
        if m.any():
            st = dict(color="0.2", lw=2.5) if i == 0 else dict(color=ATTACK_LINE_COLORS[(i - 1) % len(ATTACK_LINE_COLORS)], lw=1.4)
            # Each group sums to 1, so a group of 43 examples and the 1,100 clean ones compare.
            ax.hist(v[m], bins=bins, weights=np.full(int(m.sum()), 1.0 / m.sum()), histtype="step",
                    label=f"{_label(name)} (n={int(m.sum())})", **st)
    if gamma_alpha is not None:
        g = np.sort(v)[min(int(len(v) * gamma_alpha), len(v) - 1)]
        ax.axvline(g, ls="--", color="k", lw=1, label=f"γ (α = {gamma_alpha:g})")
    epochs = meta.get("epochs_run", meta["epochs_recorded"])
    ax.set(xscale="log", xlabel=f"teacher loss after epoch {epochs} ({meta.get('model', '?')})",
           ylabel="fraction of the group", title=title)
    ax.legend(fontsize="small", bbox_to_anchor=(1.01, 1), loc="upper left")
    return _save(fig, out_path)


def capacity_figure(df: pd.DataFrame, out_path, title: str) -> Path | None:
    """Clean accuracy and Avg. ASR of reweighting defenses against the teacher architecture,
    ordered by parameter count (LfD Fig. 4a): one line per remedy setting that >= 2 teachers
    share, so a sweep of alpha on one teacher is not averaged into its point; None if none."""
    cells = _cells(df)
    rows = cells[["remedy", "detector_type", "defender_arch"]].itertuples(index=False)
    if not capacity_swept(rows):
        return None
    from .models import parameter_count

    sweep = cells[(cells["remedy"] == "reweight") & (cells["detector_type"] == "teacher_loss")]
    lines = [(p, g) for p, g in sweep.groupby("defense_params", sort=False) if g["defender_arch"].nunique() >= 2]
    if not lines:
        return None
    size = {a: parameter_count(a) for a in pd.concat([g for _, g in lines])["defender_arch"].unique()}
    order = sorted(size, key=size.get)
    base = cells[cells["remedy"] == "none"]
    fig = _figure(figsize=(9.5, 4))
    for ax, col, name in zip(fig.subplots(1, 2), ["clean_accuracy", "mean_asr_boosted"], ["Clean accuracy", "Avg. ASR"]):
        for params, g in lines:
            s = g.groupby("defender_arch")[col].agg(["mean", "std"]).reindex(order) * 100
            label = ", ".join(f"{k} {v}" for k, v in json.loads(params).items() if k in ("alpha", "beta", "mode"))
            ax.errorbar(range(len(order)), s["mean"], yerr=s["std"].fillna(0), marker="o", capsize=3, label=label)
        if not base.empty:
            ax.axhline(base[col].mean() * 100, ls="--", color="0.4", label="no defense")
        ax.legend(fontsize="small")
        ax.set_xticks(range(len(order)), [f"{a}\n{size[a]:,}" for a in order], fontsize="small")
        ax.set(xlabel="teacher (parameters)", ylabel=f"{name} (%)", ylim=(0, 102))
    fig.suptitle(_spread_title(title, sweep))
    return _save(fig, out_path)


# ---------------------------------------------------------------- driver


def _with_bona_fide(manifest_path):
    """The manifest's `index` and `attack`, with `bona_fide` from the cell's default bona fide set
    (else the first named set drawn; all False where a grid was aggregated before its bona fide
    stage ran)."""
    import glob

    from . import paths, poisoning

    w = paths.parse("manifest", manifest_path)
    bf = None
    if w:
        cell = {k: w[k] for k in ("dataset", "scenario", "seed")}
        default = paths.path("bona_fide", w["results"], bona=paths.DEFAULT_BONA_FIDE, **cell)
        drawn = sorted(glob.glob(paths.path("bona_fide", glob.escape(w["results"]), bona="*", **cell)))
        bf = default if Path(default).exists() else (drawn[0] if drawn else None)
    man, _ = poisoning.read_manifest(manifest_path, bf)
    if "bona_fide" not in man:
        man["bona_fide"] = False
    return man[["index", "attack", "bona_fide"]]


def _manifest_of(losses_path) -> Path:
    from . import paths

    w = paths.parse("losses", losses_path)
    return Path(paths.path("manifest", w["results"], **{k: w[k] for k in ("dataset", "scenario", "seed")}))


def run(metrics_paths: Iterable, out_dir, trajectory_paths: Iterable = (), teacher_paths: Iterable = (),
        paper_numbers: str | None = None) -> dict[str, list[Path]]:
    """Write summary.csv/.parquet, tables.md (+ tables.html) and figures/*.png under out_dir; return the paths by kind.
    trajectory_paths / teacher_paths: defender models' loss files (…/seed{s}/models/{m}/trajectories.parquet)
    to draw per-epoch trajectories / teacher loss distributions of. paper_numbers: the preset whose
    papers' numbers (papers/numbers.csv) go beside the measured cells (paper_comparison.csv, first in
    the tables)."""
    out, figs = Path(out_dir), Path(out_dir) / "figures"
    df = collect(metrics_paths)
    if df.empty:
        raise ArtifactError("no metrics.json files (or none with attacks) to aggregate")
    written: dict[str, list[Path]] = {"summary": write_summary(df, out), "summary_stats": write_stats(df, out),
                                      "tables": [out / "tables.md"], "tables_per_seed": [out / "tables_per_seed.md"],
                                      "tables_html": [out / "tables.html"], "table_sections": [],
                                      "asr": [], "rreject": [], "capacity": [], "trajectories": [], "teacher": [],
                                      "singlemulti": [], "paper_comparison": []}
    comparison = None
    if paper_numbers:
        from . import papers

        comparison = papers.compare(df, paper_numbers)
        path = out / "paper_comparison.csv"
        with atomic_path(path) as tmp:
            comparison.to_csv(tmp, index=False)
        written["paper_comparison"].append(path)
    md = markdown_tables(df, comparison)
    with atomic_path(out / "tables.md") as tmp:
        tmp.write_text(md)
    with atomic_path(out / "tables.html") as tmp:
        tmp.write_text(html_tables(md), encoding="utf-8")
    with atomic_path(out / "tables_per_seed.md") as tmp:
        tmp.write_text(per_seed_tables(df))
    sections = table_sections(df, comparison)
    for kind, what in TABLE_SECTIONS.items():
        # Always written, so the workflow can declare it; a grid without this analysis gets a line saying so.
        body = "\n".join(sections[kind]) or SECTION_EMPTY[kind]
        path = out / table_section_name(kind)
        with atomic_path(path) as tmp:
            tmp.write_text(html_tables(body, title=f"poisongrid: {what}"), encoding="utf-8")
        written["table_sections"].append(path)
    for (ds, sc), g in df.groupby(["dataset", "scenario"], sort=False):
        if g["attack"].notna().any():
            written["asr"].append(asr_figure(g, figs / figure_name("asr", ds, sc), f"{ds} — {sc}"))
        if p := rreject_figure(g, figs / figure_name("rreject", ds, sc), f"{ds} — {sc}: rejection threshold"):
            written["rreject"].append(p)
        if p := capacity_figure(g, figs / figure_name("capacity", ds, sc), f"{ds} — {sc}: LfD teacher capacity"):
            written["capacity"].append(p)
    for ds, g in df.groupby("dataset", sort=False):
        if p := single_multi_figure(g, figs / figure_name("singlemulti", ds, "all"), f"{ds}: single vs multi-attack ASR"):
            written["singlemulti"].append(p)
    for kind, paths in (("trajectories", trajectory_paths), ("teacher", teacher_paths)):
        for tpath in paths:
            try:
                ds, sc, seed, m = model_of_path(tpath)
            except Exception:
                raise ArtifactError(f"{tpath}: expected …/{{dataset}}/{{scenario}}/seed{{seed}}/models/{{model}}/trajectories.parquet") from None
            name, title = figure_name(kind, ds, sc, seed, m), f"{ds} — {sc}, seed {seed}: {m}"
            if kind == "trajectories":
                written[kind].append(trajectory_figure(tpath, _manifest_of(tpath), figs / name, title))
            else:
                alpha = _first_alpha(df, ds, sc, m)
                written[kind].append(teacher_figure(tpath, _manifest_of(tpath), figs / name, title, alpha))
    return written


def _first_alpha(df: pd.DataFrame, ds: str, sc: str, model: str) -> float | None:
    """alpha of the first reweighting defense reading this teacher (from its metrics), for the γ line."""
    g = df[(df["dataset"] == ds) & (df["scenario"] == sc) & (df["defender_model"] == model) & (df["remedy"] == "reweight")]
    a = g["alpha"].dropna()
    return None if a.empty else float(a.iloc[0])
