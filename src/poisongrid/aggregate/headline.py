"""The answer first: per dataset, one compact table of every defense (clean accuracy, mean ASR plain
and boosted, detection AUROC, cost) with the best defense marked, and one figure of mean ASR against
clean accuracy with error bars over seeds. Multi-attack scenario where the grid has one, else each
attack alone (per seed, the mean over the single-attack scenarios)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .figures import _figure, _save
from .order import defense_order
from .summary import cell_level

# A defense "keeps clean accuracy" within this many points of the undefended model's.
KEEP_POINTS = 5.0
BEST_MARK = "★"
# Remedies that are references rather than defenses: never "best".
REFERENCE_REMEDIES = ("none", "oracle")
_COLS = ("clean_accuracy", "mean_asr", "mean_asr_boosted", "auroc", "cost_epochs", "cost_wall_s")


def headline_scenario(g: pd.DataFrame) -> str | None:
    """'multi', 'single' (the single-attack scenarios pooled) or None (no attack scenario)."""
    scenarios = set(g["scenario"])
    if "multi" in scenarios:
        return "multi"
    return "single" if any(str(s).startswith("single-") for s in scenarios) else None


def headline_frame(g: pd.DataFrame) -> pd.DataFrame:
    """One row per defense of one dataset: mean and sample std over seeds (in percent) of clean
    accuracy, mean ASR plain and boosted, AUROC; mean cost; and whether it is the best."""
    which = headline_scenario(g)
    cells = cell_level(g)
    if which == "multi":
        cells = cells[cells["scenario"] == "multi"]
    elif which == "single":
        cells = cells[cells["scenario"].astype(str).str.startswith("single-")]
        cells = cells.groupby(["defense", "seed"], sort=False).agg(
            {**{c: "mean" for c in _COLS if c in cells}, "remedy": "first"}).reset_index()
    else:
        return pd.DataFrame()
    rows = []
    for d in [d for d in defense_order(g) if d in set(cells["defense"])]:
        c = cells[cells["defense"] == d]
        row = {"defense": d, "remedy": c["remedy"].iloc[0], "seeds": int(c["seed"].nunique())}
        for col in ("clean_accuracy", "mean_asr", "mean_asr_boosted", "auroc"):
            v = pd.to_numeric(c[col], errors="coerce").dropna() * 100 if col in c else pd.Series(dtype=float)
            row[col] = v.mean() if len(v) else np.nan
            row[col + "_std"] = v.std(ddof=1) if len(v) > 1 else np.nan
        for col in ("cost_epochs", "cost_wall_s"):
            v = pd.to_numeric(c[col], errors="coerce").dropna() if col in c else pd.Series(dtype=float)
            row[col] = v.mean() if len(v) else np.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["asr_headline"] = frame["mean_asr_boosted"].fillna(frame["mean_asr"])
    frame["best"] = False
    undefended = frame[frame["remedy"] == "none"]
    if len(undefended) and not np.isnan(undefended["clean_accuracy"].iloc[0]):
        floor = undefended["clean_accuracy"].iloc[0] - KEEP_POINTS
        ok = frame[~frame["remedy"].isin(REFERENCE_REMEDIES) & (frame["clean_accuracy"] >= floor)
                   & frame["asr_headline"].notna()]
        if len(ok):
            frame.loc[ok["asr_headline"].idxmin(), "best"] = True
    return frame


def _pm(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "–"
    return f"{mean:.1f}" if np.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def headline_table(g: pd.DataFrame, figure: str | None = None) -> list[str]:
    """Markdown: a heading, the verdict in one sentence, the table, and the figure (a path
    relative to the results folder) if given."""
    frame = headline_frame(g)
    if frame.empty:
        return []
    ds, which = g["dataset"].iloc[0], headline_scenario(g)
    what = "all attacks at once (multi)" if which == "multi" else "each attack alone (mean over the single-attack scenarios)"
    n = int(frame["seeds"].max())
    out = [f"### {ds}{ANSWER_HEADING}{what}", ""]
    best = frame[frame["best"]]
    undefended = frame[frame["remedy"] == "none"]
    if len(best):
        b = best.iloc[0]
        out.append(f"{BEST_MARK} Best: {b['defense']}, the lowest mean ASR (paper convention) among the defenses within "
                   f"{KEEP_POINTS:g} points of the undefended model's clean accuracy "
                   f"({undefended['clean_accuracy'].iloc[0]:.1f}%): {b['asr_headline']:.1f}% at {b['clean_accuracy']:.1f}% clean "
                   f"accuracy.")
    elif len(undefended):
        out.append(f"No defense keeps clean accuracy within {KEEP_POINTS:g} points of the undefended model's "
                   f"({undefended['clean_accuracy'].iloc[0]:.1f}%).")
    out += [f"In percent, mean ± sample std over {n} seed{'s' if n != 1 else ''}; cost: epochs of training and wall "
            "minutes per cell (its defender models, scoring and final training).", ""]
    rows = []
    for _, r in frame.iterrows():
        rows.append([f"{BEST_MARK} {r['defense']}" if r["best"] else str(r["defense"]),
                     _pm(r["clean_accuracy"], r["clean_accuracy_std"]), _pm(r["mean_asr"], r["mean_asr_std"]),
                     _pm(r["mean_asr_boosted"], r["mean_asr_boosted_std"]), _pm(r["auroc"], r["auroc_std"]),
                     "–" if np.isnan(r["cost_epochs"]) else f"{r['cost_epochs']:g}",
                     "–" if np.isnan(r["cost_wall_s"]) else f"{r['cost_wall_s'] / 60:.1f}"])
    header = ["Defense", "Clean acc.", "Mean ASR, plain", "Mean ASR, boosted", "AUROC", "Cost (epochs)", "Cost (min)"]
    out += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            *["| " + " | ".join(r) + " |" for r in rows], ""]
    if figure:
        out += [f"![{ds}: mean ASR against clean accuracy per defense]({figure})", ""]
    return out


ANSWER_HEADING = " — the answer: "


def headline_text(tables_md: str) -> str:
    """The headline sections of a tables.md (each dataset's answer), without their figure lines:
    what the console shows at the end of a run."""
    out, keep = [], False
    for line in tables_md.splitlines():
        if line.startswith("### "):
            keep = ANSWER_HEADING in line
        if keep and not line.startswith("!["):
            out.append(line)
    return "\n".join(out).strip() + "\n"


def headline_figure(g: pd.DataFrame, out_path, title: str) -> Path | None:
    """Mean ASR (paper convention) against clean accuracy, one point per defense with error bars
    over seeds; the band a defense must stay in to keep clean accuracy is left clear."""
    frame = headline_frame(g)
    if frame.empty:
        return None
    fig = _figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for _, r in frame.iterrows():
        y = r["asr_headline"]
        yerr = r["mean_asr_boosted_std"] if not np.isnan(r["mean_asr_boosted"]) else r["mean_asr_std"]
        ax.errorbar(r["clean_accuracy"], y, xerr=None if np.isnan(r["clean_accuracy_std"]) else r["clean_accuracy_std"],
                    yerr=None if np.isnan(yerr) else yerr, fmt="*" if r["best"] else "o",
                    markersize=12 if r["best"] else 6, capsize=3, label=str(r["defense"]))
        ax.annotate(("★ " if r["best"] else "") + str(r["defense"]), (r["clean_accuracy"], y), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    undefended = frame[frame["remedy"] == "none"]
    if len(undefended) and not np.isnan(undefended["clean_accuracy"].iloc[0]):
        floor = undefended["clean_accuracy"].iloc[0] - KEEP_POINTS
        left, right = ax.get_xlim()
        left = min(left, floor - 1)
        ax.axvspan(left, floor, color="#eeeeee", zorder=0)
        ax.text(floor, 103, f"more than {KEEP_POINTS:g} points below the undefended model ", fontsize=7, color="#777",
                va="top", ha="right")
        ax.set_xlim(left, right)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("mean ASR, paper convention (%)")
    ax.set_ylim(-2, 105)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, out_path)
