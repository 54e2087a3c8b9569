"""The figures (the papers' Fig. 2/5-6/7/9/10 and LfD Fig. 1-2/4a) as PNG files; matplotlib and seaborn
are imported only when one is drawn."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa

from ..config import capacity_swept, swept_detectors
from ..errors import ArtifactError
from ..io import atomic_path, read_table, table_meta
from ..poisoning import SEP, attack_names
from .order import attack_label, attack_order, defense_order
from .summary import cell_level, single_vs_multi

ATTACK_LINE_COLORS = ["tab:red", "tab:orange", "tab:purple", "tab:blue", "tab:brown", "tab:pink", "tab:olive",
                      "tab:cyan"]

# The figures' group of examples that several attacks share (datasets with `overlap: true`).
SHARED = "several attacks"


def _attack_groups(attack_col: pd.Series) -> tuple[list[str], np.ndarray]:
    """The attacks of a manifest's `attack` column in paper order, and which rows carry several
    (those go to their own group; each attack's group holds the rows carrying it alone)."""
    shared = attack_col.fillna("").str.contains(SEP, regex=False).to_numpy(bool)
    return attack_order(attack_names(attack_col)), shared


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
    data = df.assign(ASR=df["asr_paper"] * 100, Attack=[attack_label(a, a in boosted) for a in df["attack"]])
    stats = data.groupby(["Attack", "defense"])["ASR"].agg(["mean", "std"]).fillna(0)
    fig = _figure(figsize=(max(6.5, 1.5 + 0.3 * len(attacks) * max(len(defenses), 2)), 4.2))
    ax = fig.add_subplot()
    sns.barplot(data=data, x="Attack", y="ASR", hue="defense", order=[attack_label(a, a in boosted) for a in attacks],
                hue_order=defenses, errorbar="sd" if df["seed"].nunique() > 1 else None, capsize=0.1, ax=ax)
    ax.set(ylim=(0, _pct_top(stats["mean"] + stats["std"])), ylabel="Attack success rate (%)", xlabel="")
    ax.set_title(_spread_title(title, df))
    ax.legend(title="Defense", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")
    return _save(fig, out_path)


def single_multi_figure(df: pd.DataFrame, out_path, title: str) -> Path | None:
    """Each attack's ASR alone vs in the multi-attack scenario, one panel per defense, one figure per
    dataset (the paper's Fig. 10): bars are means over seeds, error bars the sample std; None when
    no attack ran both alone and in the multi scenario."""
    sm = single_vs_multi(df)
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
        ax.set_xticks(x, [attack_label(a, a in boosted) for a in attacks], rotation=30 if len(attacks) > 3 else 0,
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

    cells = cell_level(df)
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
            ax.plot(epochs, np.maximum(sums[i] / counts[i], 1e-8), label=f"{attack_label(name)} (n={int(counts[i])})", **st)
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
                    label=f"{attack_label(name)} (n={int(m.sum())})", **st)
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
    cells = cell_level(df)
    rows = cells[["remedy", "detector_type", "defender_arch"]].itertuples(index=False)
    if not capacity_swept(rows):
        return None
    from ..models import parameter_count

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


def _with_bona_fide(manifest_path):
    """The manifest's `index` and `attack`, with `bona_fide` from the cell's default bona fide set
    (else the first named set drawn; all False where a grid was aggregated before its bona fide
    stage ran)."""
    import glob

    from .. import paths, poisoning

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
