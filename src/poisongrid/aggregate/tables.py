"""The Markdown tables (the papers' table shapes, per seed, cost, rejection) and their formatting:
mean ± std over seeds, the †/‡ marks and the § marks of runs below a reference's budget."""
from __future__ import annotations

import pandas as pd

from .headline import headline_table
from .order import attack_label, attack_order, defense_order
from .summary import cell_level, single_vs_multi

DAGGER_NOTE = ("† ASR measured with the blended trigger boosted 2× at test time (the paper's convention, after "
               "Zeng et al. 2022b); Avg. ASR boosted uses these values, Avg. ASR plain the plain trigger for every "
               "attack. Plain-trigger ASR per attack is in the per-dataset plain-trigger table.")
GAP_NOTE = ("‡ the boosted-trigger ASR is more than 20 points below the plain trigger's (means over seeds; plain "
            "value in brackets): boosting breaks this trigger, so the boosted number understates the attack.")

# Boosted-trigger ASR (the headline, paper convention) more than this far below the plain
# trigger's ASR means the headline understates the attack: such cells get a ‡ and the plain value.
BOOST_GAP = 0.20

# Table files, one per analysis, for the report's sections; tables.md / tables.html hold them all.
TABLE_SECTIONS = {"headline": "the answer: every defense in one table, the best marked",
                  "papers": "the papers' numbers beside ours",
                  "multi": "multi-attack results (the BaDLoss paper's Table 2 shape)",
                  "single": "single-attack results (the BaDLoss paper's Table 1 shape) and each single scenario",
                  "singlemulti": "each attack alone vs in the multi-attack scenario (the paper's Fig. 10)",
                  "cost": "the cost of each defense",
                  "rejection": "clean examples rejected in large and small classes (the paper's Appendix G)"}
SECTION_EMPTY = {"headline": "This grid has no attack scenario to answer for.",
                 "papers": "This grid names no paper's numbers to compare with (paper_numbers), or measured none of their cells.",
                 "multi": "This grid has no multi-attack scenario.",
                 "single": "This grid has no single-attack or clean scenario.",
                 "singlemulti": "No attack ran both alone (single-<attack>) and in the multi scenario under one defense.",
                 "cost": "No cell of this grid has a cost record (metrics from before cost was recorded).",
                 "rejection": "No defense of this grid removes examples (or its metrics predate the per-class counts)."}


def table_section_name(kind: str) -> str:
    return f"tables_{kind}.html"


# ---------------------------------------------------------------- formatting

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


# ---------------------------------------------------------------- tables

def scenario_table(g: pd.DataFrame, ds: str, sc: str) -> list[str]:
    """One dataset and scenario in the paper's Table 2 shape: clean accuracy, ASR per attack (paper
    convention), Avg. ASR plain and boosted, and the detector's AUROC and recall where it has one."""
    attacks = attack_order(g["attack"])
    boosted = g["asr_boosted"].notna().any()
    boosted_attacks = set(g.loc[g["asr_boosted"].notna(), "attack"])
    detects = g["auroc"].notna().any() or g["recall_removed"].notna().any()
    # Several final-model architectures (the paper's Table 5): each row names its own.
    archs = g["arch"].nunique() > 1
    header = ["Defense", *(["Arch."] if archs else []), "n", "Clean Acc.", *[attack_label(a, a in boosted_attacks) for a in attacks]]
    header += (_avg_columns(boosted) if attacks else []) + (["AUROC", "Recall (removed)"] if detects else [])
    rows, gap = [], False
    for d in defense_order(g):
        gd = g[g["defense"] == d]
        cd, n = cell_level(gd), _n(gd)
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
    header = ["Defense", "n", "Clean Acc. (mean)", *[attack_label(a, a in boosted_attacks) for a in singles],
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
                         _pct(cell_level(gd)["mean_asr"], n)])
    ds = g["dataset"].iloc[0]
    return [f"### {ds} — plain-trigger ASR", "", f"ASR with the un-boosted test trigger, in percent "
            f"({_seeds_note(g)}).", "", *_md_table(["Scenario", "Defense", "n", *map(attack_label, attacks), "Avg. ASR"], rows, 3), ""]


def table_sections(df: pd.DataFrame, comparison: pd.DataFrame | None = None,
                   headline_figures: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Markdown of every table, per analysis (TABLE_SECTIONS), datasets in order of appearance;
    `comparison` (papers.compare) gives the papers' section, `headline_figures` (dataset -> figure
    path relative to the results folder) the figure under each dataset's headline table."""
    from .. import papers

    out: dict[str, list[str]] = {k: [] for k in TABLE_SECTIONS}
    out["plain"] = []
    out["papers"] = papers.tables(comparison) if comparison is not None else []
    for ds, g in df.groupby("dataset", sort=False):
        scenarios = list(dict.fromkeys(g["scenario"]))
        budget = budget_marks(g)
        out["headline"] += budget.mark(headline_table(g, (headline_figures or {}).get(ds)))
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


def markdown_tables(df: pd.DataFrame, comparison: pd.DataFrame | None = None,
                    headline_figures: dict[str, str] | None = None) -> str:
    s = table_sections(df, comparison, headline_figures)
    return "\n".join(s["headline"] + s["papers"] + s["multi"] + s["single"] + s["singlemulti"] + s["plain"] + s["cost"] + s["rejection"])


BUDGET_MARK = "§"


class BudgetMarks:
    """The defenses and attacks of one dataset that ran below their reference's budget (a
    detector's shortened search, a learned attack's shorter training): their names get BUDGET_MARK
    in every table, and a note lists what was cut."""

    def __init__(self, defenses: dict[str, str], attacks: dict[str, str]):
        self.defenses, self.attacks = defenses, attacks
        self.labels = {attack_label(a): a for a in attacks}

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
                [f"- attack {attack_label(a)}: {n}" for a, n in self.attacks.items()]
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
        header = ["Defense", "Seed", "Clean Acc.", *[attack_label(a, a in boosted) for a in attacks]]
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


def single_vs_multi_table(g: pd.DataFrame) -> list[str]:
    """The paper's Fig. 10 as a table: each attack's ASR alone vs with the others, per defense."""
    sm = single_vs_multi(g)
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
            *_md_table(["Defense", "n", *map(attack_label, attacks)], rows, 2), ""]


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
        row = ["No attack" if sc == "clean" else attack_label(sc[len("single-"):]), str(n)]
        for d in defenses:
            c = gs[(gs["scenario"] == sc) & (gs["defense"] == d)]
            row += [_pct(cell_level(c)["clean_accuracy"], n), "–" if sc == "clean" else _pct(c["asr_paper"], n)]
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
    cells = cell_level(g)
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
    cells = cell_level(g)
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
