"""Aggregate grid cells into a tidy summary, Markdown tables (paper Table 2 shape) and figures (Fig. 2/5-6/7/9).

The package's modules, each importing only those listed before it:
  order    the order and display names of attacks and defenses
  summary  collect metrics.json files into the tidy summary; statistics over seeds
  figures  the figures
  headline the answer first: one table of every defense, the best marked, and its figure
  tables   the Markdown tables and their formatting (mean ± std, †/‡ and § marks)
  html     standalone HTML pages of the tables
and here run(), which writes them all, and every name used from outside."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from ..config import figure_name, model_of_path
from ..errors import ArtifactError
from ..io import atomic_path
from .figures import (ATTACK_LINE_COLORS, SHARED, asr_figure, capacity_figure, rreject_figure, single_multi_figure,
                      teacher_figure, trajectory_figure)
from .headline import (BEST_MARK, KEEP_POINTS, headline_figure, headline_frame, headline_scenario, headline_table,
                       headline_text)
from .html import TABLES_CSS, html_tables
from .order import ATTACK_NAMES, attack_order, defense_order
from .summary import (CELL, CELL_COLUMNS, COLUMNS, REJECTION_COLUMNS, REQUIRED, STAT_KEYS, STAT_METRICS, TAIL_FRACTION,
                      class_rejection, collect, seed_stats, write_stats, write_summary)
from .tables import (BOOST_GAP, BUDGET_MARK, DAGGER_NOTE, GAP_NOTE, SECTION_EMPTY, TABLE_SECTIONS, BudgetMarks,
                     budget_marks, cost_table, markdown_tables, per_attack_table, per_seed_tables, plain_table,
                     rejection_table, scenario_table, single_attack_table, single_vs_multi_table, table_section_name,
                     table_sections, understated)

__all__ = ["ATTACK_LINE_COLORS", "ATTACK_NAMES", "BEST_MARK", "BOOST_GAP", "BUDGET_MARK", "CELL", "KEEP_POINTS",
           "headline_figure", "headline_frame", "headline_scenario", "headline_table", "headline_text", "CELL_COLUMNS", "COLUMNS",
           "DAGGER_NOTE", "GAP_NOTE", "REJECTION_COLUMNS", "REQUIRED", "SECTION_EMPTY", "SHARED", "STAT_KEYS",
           "STAT_METRICS", "TABLES_CSS", "TABLE_SECTIONS", "TAIL_FRACTION", "BudgetMarks", "asr_figure",
           "attack_order", "budget_marks", "capacity_figure", "class_rejection", "collect", "cost_table",
           "defense_order", "html_tables", "markdown_tables", "per_attack_table", "per_seed_tables", "plain_table",
           "rejection_table", "rreject_figure", "run", "scenario_table", "seed_stats", "single_attack_table",
           "single_multi_figure", "single_vs_multi_table", "table_section_name", "table_sections", "teacher_figure",
           "trajectory_figure", "understated", "write_stats", "write_summary"]


# ---------------------------------------------------------------- driver

def _manifest_of(losses_path) -> Path:
    from .. import paths

    w = paths.parse("losses", losses_path)
    return Path(paths.path("manifest", w["results"], **{k: w[k] for k in ("dataset", "scenario", "seed")}))


def run(metrics_paths: Iterable, out_dir, trajectory_paths: Iterable = (), teacher_paths: Iterable = (),
        paper_numbers: str | None = None) -> dict[str, list[Path]]:
    """Write summary.csv/.parquet, tables.md (+ tables.html) and figures/*.png under out_dir; return the paths by kind.
    trajectory_paths / teacher_paths: defender models' loss files (…/seed{s}/models/{m}/trajectories.parquet)
    to draw per-epoch trajectories / teacher loss distributions of. paper_numbers: the preset whose
    papers' numbers (papers/numbers.csv) go beside the measured cells (paper_comparison.csv, first in
    the tables).

    All or nothing: everything is written into a folder beside the outputs first and moved into
    place only once all of it exists, so a failure (a full disk) leaves the previous outputs as they
    were, never a mix of new tables and old figures."""
    import shutil
    import tempfile

    from ..io import write_failure

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".aggregate-", dir=out))
    except OSError as e:
        raise write_failure(out, e) from None
    try:
        written = _write(metrics_paths, staging, trajectory_paths, teacher_paths, paper_numbers)
        final = {k: [out / p.relative_to(staging) for p in ps] for k, ps in written.items()}
        _swap_in([(s, d) for ps, ds in zip(written.values(), final.values()) for s, d in zip(ps, ds)], staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _swap_in(moves: list[tuple[Path, Path]], staging: Path) -> None:
    """Rename every staged file onto its place, the previous version set aside first; if one rename
    fails, undo those done so the previous outputs stand whole."""
    import os

    from ..io import write_failure

    backup = staging / ".previous"
    done: list[tuple[Path, Path | None]] = []
    try:
        for i, (src, dst) in enumerate(moves):
            old = None
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                old = backup / str(i)
                old.parent.mkdir(exist_ok=True)
                os.replace(dst, old)
            done.append((dst, old))
            os.replace(src, dst)
    except OSError as e:
        failed = dst
        for placed, old in reversed(done):
            try:
                if old is not None:
                    os.replace(old, placed)
                elif placed.exists():
                    placed.unlink()
            except OSError:
                pass
        raise write_failure(failed, e) from None


def _write(metrics_paths: Iterable, out_dir, trajectory_paths: Iterable, teacher_paths: Iterable,
           paper_numbers: str | None) -> dict[str, list[Path]]:
    out, figs = Path(out_dir), Path(out_dir) / "figures"
    df = collect(metrics_paths)
    if df.empty:
        raise ArtifactError("no metrics.json files (or none with attacks) to aggregate")
    written: dict[str, list[Path]] = {"summary": write_summary(df, out), "summary_stats": write_stats(df, out),
                                      "tables": [out / "tables.md"], "tables_per_seed": [out / "tables_per_seed.md"],
                                      "tables_html": [out / "tables.html"], "table_sections": [],
                                      "asr": [], "rreject": [], "capacity": [], "trajectories": [], "teacher": [],
                                      "singlemulti": [], "paper_comparison": [], "headline": []}
    comparison = None
    if paper_numbers:
        from .. import papers

        comparison = papers.compare(df, paper_numbers)
        path = out / "paper_comparison.csv"
        with atomic_path(path) as tmp:
            comparison.to_csv(tmp, index=False)
        written["paper_comparison"].append(path)
    # The answer first: each dataset's headline figure, shown under its headline table everywhere.
    headline: dict[str, str] = {}
    images: dict[str, bytes] = {}
    for ds, g in df.groupby("dataset", sort=False):
        sc = headline_scenario(g)
        name = figure_name("headline", ds, sc) if sc else None
        if name and (p := headline_figure(g, figs / name, f"{ds} — {'multi-attack' if sc == 'multi' else 'each attack alone'}: "
                                          "mean ASR against clean accuracy")):
            written["headline"].append(p)
            headline[ds] = f"figures/{name}"
            images[headline[ds]] = p.read_bytes()
    md = markdown_tables(df, comparison, headline)
    with atomic_path(out / "tables.md") as tmp:
        tmp.write_text(md)
    with atomic_path(out / "tables.html") as tmp:
        tmp.write_text(html_tables(md, images=images), encoding="utf-8")
    with atomic_path(out / "tables_per_seed.md") as tmp:
        tmp.write_text(per_seed_tables(df))
    sections = table_sections(df, comparison, headline)
    for kind, what in TABLE_SECTIONS.items():
        # Always written, so the workflow can declare it; a grid without this analysis gets a line saying so.
        body = "\n".join(sections[kind]) or SECTION_EMPTY[kind]
        path = out / table_section_name(kind)
        with atomic_path(path) as tmp:
            tmp.write_text(html_tables(body, title=f"poisongrid: {what}", images=images), encoding="utf-8")
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
