import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from poisongrid import aggregate
from poisongrid.errors import ArtifactError
from planted import write_manifest
from poisongrid.io import read_json, read_table, write_json, write_table

ATTACKS = ["patch", "single_pixel", "blend_random"]


def cell(root, dataset="digits", scenario="multi", seed=0, defense="badloss", r=0.4, clean=0.93,
         asr=(0.02, 0.05, 0.10), boosted=0.20, auroc=0.91, recall=0.95, lfd=None, arch="smallcnn", none=None):
    """Write one metrics.json in the results layout; defense 'none' has no detector/detection/r_reject;
    lfd=<teacher architecture> makes an LfD (teacher loss + reweight) cell."""
    none = defense == "none" if none is None else none
    plain = dict(zip(ATTACKS, asr))
    paper = {**plain, "blend_random": boosted}
    m = {"dataset": dataset, "scenario": scenario, "seed": seed, "defense": defense,
         "detector": None if none else "badloss", "remedy": "none" if none else "remove",
         "defense_params": {} if none else {"r_reject": r}, "attacks": ATTACKS,
         "targets": {"patch": 3, "single_pixel": 7, "blend_random": 3}, "clean_accuracy": clean,
         "asr": plain, "asr_boosted": {"blend_random": boosted},
         "mean_asr": float(np.mean(list(plain.values()))), "mean_asr_boosted": float(np.mean(list(paper.values()))),
         "detection": None if none else {
             "auroc": auroc, "auroc_per_attack": {"patch": 0.99, "single_pixel": 0.97, "blend_random": 0.80},
             "recall_removed": recall, "recall_per_attack": {"patch": 1.0, "single_pixel": 0.98, "blend_random": 0.85},
             "precision_removed": 0.21},
         "n_train": 1437, "n_poisoned": 100, "n_removed": 0 if none else 570,
         "wall_time_s": {"pretrain": 12.0, "score": None if none else 0.5, "train": 30.0, "evaluate": 1.0},
         "config": {}, "versions": {}, "device": "cpu", "arch": arch}
    if lfd:
        m.update(detector="lfd", remedy="reweight", detector_type="teacher_loss", defense_params={"alpha": 0.15, "beta": 1e-3},
                 defender_model={"model_name": "teacher", "model": lfd}, n_ascent=150, n_removed=0)
    elif not none:
        m.update(detector_type="badloss", defender_model={"model_name": "pretrain", "model": "smallcnn"})
    path = root / "results" / dataset / scenario / f"seed{seed}" / defense / "metrics.json"
    write_json(path, m)
    return path


def pct(s):  # the markdown row for a defense, split into cells
    return [c.strip() for c in s.strip("| ").split("|")]


def table_rows(md, heading):
    block = md.split(f"### {heading}\n")[1].split("###")[0]
    return {pct(line)[0]: pct(line) for line in block.splitlines() if line.startswith("| ") and "---" not in line}


def test_collect_rows_and_values(tmp_path):
    paths = [cell(tmp_path, defense="none", asr=(0.98, 0.90, 0.30), boosted=0.99, clean=0.95), cell(tmp_path)]
    df = aggregate.collect(paths)
    assert list(df.columns) == aggregate.COLUMNS
    assert len(df) == 6 and set(df["defense"]) == {"none", "badloss"}
    none = df[df["defense"] == "none"].set_index("attack")
    assert math.isnan(none.loc["patch", "r_reject"]) and pd.isna(none.loc["patch", "detector"])
    assert none.loc["patch", "asr_paper"] == 0.98 and math.isnan(none.loc["patch", "asr_boosted"])
    assert none.loc["blend_random", "asr"] == 0.30 and none.loc["blend_random", "asr_paper"] == 0.99  # boosted wins
    assert math.isnan(none.loc["patch", "auroc_attack"]) and math.isnan(none.loc["patch", "auroc"])
    assert none.loc["patch", "wall_time_total_s"] == pytest.approx(43.0)
    bl = df[df["defense"] == "badloss"].set_index("attack")
    assert bl.loc["single_pixel", "target"] == 7 and bl.loc["patch", "r_reject"] == 0.4
    assert bl.loc["blend_random", "auroc_attack"] == 0.80 and bl.loc["blend_random", "recall_attack"] == 0.85
    assert bl.loc["patch", "n_removed"] == 570 and bl.loc["patch", "wall_time_total_s"] == pytest.approx(43.5)
    assert bl.loc["patch", "mean_asr_boosted"] == pytest.approx((0.02 + 0.05 + 0.20) / 3)


def test_table_paper_convention_order_and_seeds(tmp_path):
    # badloss listed first on purpose: the table must still put 'none' first.
    paths = [cell(tmp_path, seed=s, clean=c, asr=(a, 0.05, 0.10)) for s, c, a in [(0, 0.93, 0.02), (1, 0.91, 0.04)]]
    paths += [cell(tmp_path, defense="none", seed=s, asr=(0.98, 0.90, 0.30), boosted=0.99, clean=0.95) for s in (0, 1)]
    md = aggregate.markdown_tables(aggregate.collect(paths))
    assert "### digits — multi" in md and "2 seeds, mean ± sample std over seeds" in md
    block = md.split("### digits — multi\n")[1].split("###")[0]
    header = pct(next(line for line in block.splitlines() if line.startswith("| Defense")))
    assert header == ["Defense", "n", "Clean Acc.", "Patch", "Single-Pix", "Blend-R†", "Avg. ASR plain",
                      "Avg. ASR boosted†", "AUROC", "Recall (removed)"]
    rows = [pct(line)[0] for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["none", "badloss"]
    assert "† ASR measured with the blended trigger boosted 2×" in block
    r = table_rows(md, "digits — multi")
    assert r["none"][1:6] == ["2", "95.00 ± 0.00", "98.00 ± 0.00", "90.00 ± 0.00", "99.00 ± 0.00"]
    assert r["badloss"][2] == "92.00 ± 1.41" and r["badloss"][3] == "3.00 ± 1.41"  # sample std over seeds
    assert r["badloss"][5] == "20.00 ± 0.00" and r["badloss"][8:] == ["91.00 ± 0.00", "95.00 ± 0.00"]
    # Avg. ASR plain (2+5+10)/3, (4+5+10)/3 and boosted (2+5+20)/3, (4+5+20)/3, side by side.
    assert r["badloss"][6:8] == ["6.00 ± 0.47", "9.33 ± 0.47"]
    assert r["none"][8:] == ["–", "–"]
    block = md.split("### digits — plain-trigger ASR\n")[1]
    plain = [pct(line) for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [p[:3] for p in plain] == [["multi", "none", "2"], ["multi", "badloss", "2"]]
    assert plain[0][5] == "30.00 ± 0.00" and plain[1][5] == "10.00 ± 0.00"  # un-boosted Blend-R


def test_single_seed_without_std_and_rreject_order(tmp_path):
    paths = [cell(tmp_path, defense=f"badloss_r{int(r * 100)}", r=r) for r in (0.6, 0.2)]
    paths.append(cell(tmp_path, defense="none", asr=(0.98, 0.9, 0.3)))
    df = aggregate.collect(paths)
    assert aggregate.defense_order(df) == ["none", "badloss_r20", "badloss_r60"]
    md = aggregate.markdown_tables(df)
    r = table_rows(md, "digits — multi")
    assert r["none"][1] == "1" and r["none"][3] == "98.00" and "±" not in "".join(r["none"])
    assert "n=1 seed: single values, no spread" in md


def test_bad_metrics_names_file_and_key(tmp_path):
    p = cell(tmp_path)
    m = read_json(p)
    del m["clean_accuracy"]
    write_json(p, m)
    with pytest.raises(ArtifactError, match=r"metrics\.json.*'clean_accuracy'"):
        aggregate.collect([p])
    m["clean_accuracy"] = 0.9
    del m["asr"]["single_pixel"]
    write_json(p, m)
    with pytest.raises(ArtifactError, match=r"'asr\.single_pixel'"):
        aggregate.collect([p])
    m["asr"]["single_pixel"] = 0.1
    m["seed"] = 3  # file sits under seed0/
    write_json(p, m)
    with pytest.raises(ArtifactError, match="path says"):
        aggregate.collect([p])


def pretrain_cell(root, dataset="digits", scenario="multi", seed=0, n=400, epochs=8, skipped=(3,), model="pretrain"):
    """Trajectories + manifest per the contract; the manifest's attack column is null for untouched examples."""
    rng = np.random.default_rng(seed)
    attack = np.full(n, None, dtype=object)
    attack[:20], attack[20:30], attack[30:40] = "patch", "single_pixel", "sinusoid"
    bona = np.zeros(n, bool)
    bona[100:150] = True
    e = np.arange(epochs)
    rate = np.where(attack == "patch", 0.8, np.where(attack == "single_pixel", 0.05, 0.3))[:, None]
    loss = 2.3 * np.exp(-rate * e) * rng.uniform(0.8, 1.2, (n, epochs))
    loss[:, list(skipped)] *= 5  # the loss spike that made those epochs rejected
    loss[0, -1] = 0.0  # a perfectly fitted example must not break the log axis
    base = root / "results" / dataset / scenario / f"seed{seed}"
    man = pd.DataFrame({"index": np.arange(n, dtype=np.int64), "label": rng.integers(0, 10, n),
                        "orig_label": rng.integers(0, 10, n), "attack": pd.array(attack, dtype="string"),
                        "target": np.where(pd.isna(attack), -1, 3).astype(np.int64), "bona_fide": bona})
    write_manifest(base / "poison" / "manifest.parquet", man, {"cell": {"dataset": dataset, "scenario": scenario, "seed": seed}},
                   bona_fide_path=base / "bona_fide" / "default.parquet")
    cols = {"index": pa.array(np.arange(n, dtype=np.int64))}
    cols |= {f"loss_e{k:03d}": pa.array(loss[:, k].astype(np.float32)) for k in range(epochs)}
    accepted = [k for k in range(epochs) if k not in skipped]
    tpath = base / "models" / model / "trajectories.parquet"
    write_table(tpath, pa.table(cols), "trajectories",
                {"accepted_epochs": accepted, "skipped_epochs": list(skipped), "epochs_recorded": epochs, "model": "resnet_s"})
    return tpath, base / "poison" / "manifest.parquet"


def is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_teacher_figure(tmp_path):
    t, m = pretrain_cell(tmp_path, epochs=1, skipped=(), model="teacher")
    out = aggregate.teacher_figure(t, m, tmp_path / "teacher.png", "digits — multi, seed 0", gamma_alpha=0.15)
    assert is_png(out)


def test_trajectory_figure(tmp_path):
    t, m = pretrain_cell(tmp_path)
    out = aggregate.trajectory_figure(t, m, tmp_path / "traj.png", "digits — multi, seed 0")
    assert is_png(out) and not list(tmp_path.glob(".traj.png*"))  # no temp file left behind
    # A manifest from another run (fewer examples) is rejected rather than silently mis-grouped.
    man, meta = read_table(m, "manifest")
    write_table(m, man.slice(0, 300), "manifest", meta)
    with pytest.raises(ArtifactError, match="another poisoned set"):  # its bona fide file no longer fits
        aggregate.trajectory_figure(t, m, tmp_path / "bad.png", "x")
    (m.parent.parent / "bona_fide" / "default.parquet").unlink()
    with pytest.raises(ArtifactError, match="indices missing"):
        aggregate.trajectory_figure(t, m, tmp_path / "bad.png", "x")
    assert not (tmp_path / "bad.png").exists()


def test_run_writes_everything(tmp_path):
    paths = [cell(tmp_path, defense="none", seed=s, asr=(0.98, 0.9, 0.3)) for s in (0, 1)]
    paths += [cell(tmp_path, defense=f"badloss_r{int(r * 100)}", r=r, seed=s) for r in (0.2, 0.4) for s in (0, 1)]
    # A second scenario with one r_reject only: no r_reject figure for it.
    paths += [cell(tmp_path, scenario="patch", defense=d, r=0.4) for d in ("none", "badloss")]
    # LfD students on two teachers in the multi scenario: a capacity figure there.
    paths += [cell(tmp_path, defense=f"lfd_{a}", seed=s, lfd=a) for a in ("resnet_s", "resnet_s1") for s in (0, 1)]
    traj = [pretrain_cell(tmp_path)[0], pretrain_cell(tmp_path, seed=1)[0]]
    teacher = [pretrain_cell(tmp_path, epochs=1, skipped=(), model="teacher")[0]]
    out = tmp_path / "report"
    w = aggregate.run(paths, out, trajectory_paths=traj, teacher_paths=teacher)

    figs = out / "figures"
    assert w["asr"] == [figs / "fig_asr_digits_multi.png", figs / "fig_asr_digits_patch.png"]
    assert w["rreject"] == [figs / "fig_rreject_digits_multi.png"]
    assert w["capacity"] == [figs / "fig_capacity_digits_multi.png"]
    assert not (figs / "fig_rreject_digits_patch.png").exists()
    assert w["trajectories"] == [figs / f"fig_trajectories_digits_multi_seed{s}_pretrain.png" for s in (0, 1)]
    assert w["teacher"] == [figs / "fig_teacher_digits_multi_seed0_teacher.png"]
    assert w["headline"] == [figs / "fig_headline_digits_multi.png"]  # the answer: multi, where the grid has it
    kinds = ("asr", "rreject", "capacity", "trajectories", "teacher", "headline")
    assert all(is_png(p) for k in kinds for p in w[k])
    assert sorted(p.name for p in figs.iterdir()) == sorted(p.name for k in kinds for p in w[k])

    assert w["summary"] == [out / "summary.csv", out / "summary.parquet"]
    csv = pd.read_csv(out / "summary.csv")
    assert len(csv) == 3 * (2 + 4 + 2 + 4) and list(csv.columns) == aggregate.COLUMNS
    table, _ = read_table(out / "summary.parquet", "summary")
    assert table.num_rows == len(csv)
    md = (out / "tables.md").read_text()
    assert w["tables"] == [out / "tables.md"] and "### digits — patch" in md and "98.00 ± 0.00" in md
    assert w["summary_stats"] == [out / "summary_stats.csv"] and w["tables_per_seed"] == [out / "tables_per_seed.md"]
    assert w["table_sections"] == [out / f"tables_{k}.html" for k in ("headline", "papers", "multi", "single", "singlemulti", "cost", "rejection")]
    # No single-attack scenario, no cost record here: those pages are written and say so.
    assert "No attack ran both alone" in (out / "tables_singlemulti.html").read_text()
    assert "<h3>digits — multi</h3>" in (out / "tables_multi.html").read_text()


def test_run_without_cells_is_an_error(tmp_path):
    with pytest.raises(ArtifactError, match="no metrics"):
        aggregate.run([], tmp_path)


def test_single_vs_multi_and_cost_tables(tmp_path):
    """Fig. 10 as a table and figure: each attack's ASR alone vs in the multi scenario; and each
    defense's cost from its metrics' cost record."""
    from poisongrid.io import read_json as rj

    paths = []
    for seed in (0, 1):
        for d, asr_multi, asr_single in (("none", (0.9, 0.8, 0.7), (0.95, 0.85, 0.75)), ("badloss", (0.3, 0.2, 0.1), (0.01, 0.02, 0.03))):
            paths.append(cell(tmp_path, defense=d, seed=seed, asr=asr_multi, boosted=asr_multi[2]))
            for i, a in enumerate(ATTACKS):
                p = cell(tmp_path, defense=d, scenario=f"single-{a}", seed=seed, asr=asr_single, boosted=asr_single[2])
                m = rj(p)
                m.update(attacks=[a], targets={a: 3}, asr={a: asr_single[i] + 0.01 * seed}, asr_boosted={}, mean_asr=asr_single[i])
                m["cost"] = {"defender_models": {"attacked": {"epochs": 30, "wall_time_s": 60.0}} if d == "none" else
                             {"pretrain": {"epochs": 9, "wall_time_s": 18.0}},
                             "final_training": None if d == "none" else {"epochs": 30, "wall_time_s": 50.0 + seed * 10},
                             "score_wall_time_s": None if d == "none" else 6.0, "epochs": 30 if d == "none" else 39,
                             "wall_time_s": 60.0 if d == "none" else 74.0 + seed * 10}
                write_json(p, m)
                paths.append(p)
    out = aggregate.run(paths, tmp_path / "agg")
    md = (tmp_path / "agg" / "tables.md").read_text()
    rows = table_rows(md, "digits — single vs multi-attack ASR")
    # badloss, patch: alone 1.00 and 2.00 over the two seeds -> 1.50 ± 0.71; multi 30.00 on both.
    assert rows["badloss"][1:3] == ["2", "1.50 ± 0.71 / 30.00 ± 0.00"]
    assert rows["none"][2].endswith("/ 90.00 ± 0.00")
    cost = table_rows(md, "digits — cost of each defense")
    # Only the single cells carry a cost record: badloss 9 model + 30 final epochs, 74/84 s total.
    assert cost["badloss"][1:5] == ["6", "9", "30", "39"] and cost["badloss"][-1] == "1.3 ± 0.1"
    assert cost["none"][1:5] == ["6", "30", "0", "30"]
    assert len(out["singlemulti"]) == 1 and is_png(out["singlemulti"][0])


def test_clean_scenario_and_the_per_attack_table(tmp_path):
    """The clean scenario (no attack) has a row of its own; with it the LfD-shaped table lists
    each attack alone and no attack, clean accuracy and ASR per defense."""
    paths = []
    for d, clean_acc, asr in (("none", 0.95, (0.99, 0.98, 0.97)), ("badloss", 0.93, (0.02, 0.05, 0.10))):
        p = cell(tmp_path, defense=d, scenario="clean", clean=clean_acc + 0.01)
        m = read_json(p)
        m.update(attacks=[], targets={}, asr={}, asr_boosted={}, mean_asr=None, mean_asr_boosted=None, n_poisoned=0)
        if m.get("detection"):
            m["detection"].update(auroc=None, recall_removed=None, auroc_per_attack={}, recall_per_attack={})
        write_json(p, m)
        paths.append(p)
        for i, a in enumerate(ATTACKS[:2]):
            p = cell(tmp_path, defense=d, scenario=f"single-{a}", clean=clean_acc, asr=asr, boosted=asr[2])
            m = read_json(p)
            m.update(attacks=[a], targets={a: 3}, asr={a: asr[i]}, asr_boosted={}, mean_asr=asr[i], mean_asr_boosted=asr[i])
            write_json(p, m)
            paths.append(p)
    df = aggregate.collect(paths)
    clean = df[df["scenario"] == "clean"]
    assert len(clean) == 2 and clean["attack"].isna().all() and clean["mean_asr"].isna().all()
    out = aggregate.run(paths, tmp_path / "agg")
    md = (tmp_path / "agg" / "tables.md").read_text()
    rows = table_rows(md, "digits — per attack (LfD Table 2 shape)")
    assert rows["No attack"] == ["No attack", "1", "96.00", "–", "94.00", "–"]
    assert rows["Patch"] == ["Patch", "1", "95.00", "99.00", "93.00", "2.00"]
    assert rows["Single-Pix"][3] == "98.00" and rows["Single-Pix"][5] == "5.00"
    clean_rows = table_rows(md, "digits — clean")
    assert clean_rows["Defense"] == ["Defense", "n", "Clean Acc."]  # no attack: no ASR columns
    assert clean_rows["none"][1:] == ["1", "96.00"]
    assert not any("clean" in p.name for p in out["asr"])


def test_figures_group_images_several_attacks_share(tmp_path):
    """With overlap a manifest row may name several attacks (joined by '+'): each attack's group keeps
    the rows carrying it alone, the shared rows form one more group."""
    col = pd.Series(pd.array(["sinusoid+patch", "patch", None, "single_pixel", "patch+single_pixel"], dtype="string"))
    attacks, shared = aggregate.figures._attack_groups(col)
    assert attacks == ["patch", "single_pixel", "sinusoid"] and shared.tolist() == [True, False, False, False, True]
    t2, _ = pretrain_cell(tmp_path, epochs=1, skipped=(), model="teacher")
    t, m = pretrain_cell(tmp_path)  # the same manifest as the teacher's cell
    man, meta = read_table(m, "manifest")
    df = man.to_pandas()
    df.loc[:9, "attack"] = "sinusoid+patch"
    write_table(m, pa.Table.from_pandas(df, preserve_index=False), "manifest", meta)
    assert is_png(aggregate.trajectory_figure(t, m, tmp_path / "traj.png", "x"))
    assert is_png(aggregate.teacher_figure(t2, m, tmp_path / "teacher.png", "x"))


def planted_seeds(root):
    """Three seeds of a multi cell and each single-<attack> cell for two defenses, values drawn at random
    (fixed seed) so every metric has its own spread; blend_random's boosted ASR is planted far below its
    plain ASR for the undefended model (the case the ‡ mark is for)."""
    rng = np.random.default_rng(7)
    paths = []
    for seed in (0, 1, 2):
        for d in ("none", "badloss"):
            hi = d == "none"
            asr = tuple(rng.uniform(0.85, 1.0, 3) if hi else rng.uniform(0.0, 0.2, 3))
            boosted = float(rng.uniform(0.1, 0.3)) if hi else float(rng.uniform(0.0, 0.2))
            for sc in ["multi", *[f"single-{a}" for a in ATTACKS]]:
                clean = float(rng.uniform(0.85, 0.95))
                p = cell(root, defense=d, scenario=sc, seed=seed, asr=asr, boosted=boosted, clean=clean)
                if sc != "multi":
                    a = sc[len("single-"):]
                    m = read_json(p)
                    b = {a: boosted} if a == "blend_random" else {}
                    m.update(attacks=[a], targets={a: 3}, asr={a: m["asr"][a]}, asr_boosted=b,
                             mean_asr=m["asr"][a], mean_asr_boosted=b.get(a, m["asr"][a]))
                    write_json(p, m)
                paths.append(p)
    return paths


def fmt(values):  # the tables' "mean ± std" from a direct computation
    v = pd.Series(values) * 100
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def test_mean_std_n_equal_a_direct_groupby_of_the_per_seed_rows(tmp_path):
    w = aggregate.run(planted_seeds(tmp_path), tmp_path / "agg")
    per_seed = pd.read_csv(tmp_path / "agg" / "summary.csv")
    assert len(per_seed) == 3 * 2 * (3 + 3) and sorted(per_seed["seed"].unique()) == [0, 1, 2]
    stats = pd.read_csv(w["summary_stats"][0])
    keys = ["dataset", "scenario", "defense", "attack"]
    direct = per_seed.groupby(keys).agg(n=("seed", "nunique"), asr_mean=("asr", "mean"), asr_std=("asr", "std"),
                                        asr_paper_mean=("asr_paper", "mean"), asr_paper_std=("asr_paper", "std"),
                                        clean_accuracy_mean=("clean_accuracy", "mean"),
                                        clean_accuracy_std=("clean_accuracy", "std"))
    got = stats.set_index(keys)[direct.columns].loc[direct.index]
    assert (got["n"] == 3).all()
    pd.testing.assert_frame_equal(got, direct, check_dtype=False)

    # The table cells are those same numbers: multi, badloss, every attack and clean accuracy.
    md = (tmp_path / "agg" / "tables.md").read_text()
    r = table_rows(md, "digits — multi")
    bl = per_seed[(per_seed["scenario"] == "multi") & (per_seed["defense"] == "badloss")]
    assert r["badloss"][1] == "3"
    assert r["badloss"][2] == fmt(bl.drop_duplicates("seed")["clean_accuracy"])
    for i, a in enumerate(ATTACKS):
        assert r["badloss"][3 + i] == fmt(bl.loc[bl["attack"] == a, "asr_paper"]), a
    cells = bl.drop_duplicates("seed")
    assert r["badloss"][6:8] == [fmt(cells["mean_asr"]), fmt(cells["mean_asr_boosted"])]

    # Per-seed table: one row per defense and seed with the cell's own values.
    ps = (tmp_path / "agg" / "tables_per_seed.md").read_text()
    block = ps.split("### digits — multi, per seed\n")[1].split("###")[0]
    rows = [pct(line) for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row[:2] for row in rows] == [["none", "0"], ["none", "1"], ["none", "2"],
                                         ["badloss", "0"], ["badloss", "1"], ["badloss", "2"]]
    one = bl[(bl["seed"] == 1) & (bl["attack"] == "patch")].iloc[0]
    assert rows[4][3] == f"{one['asr_paper'] * 100:.2f}"


def test_single_attack_table_and_understated_boosted_asr(tmp_path):
    paths = planted_seeds(tmp_path)
    aggregate.run(paths, tmp_path / "agg")
    df = pd.read_csv(tmp_path / "agg" / "summary.csv")
    md = (tmp_path / "agg" / "tables.md").read_text()
    r = table_rows(md, "digits — single attack (Table 1 shape)")
    assert r["Defense"] == ["Defense", "n", "Clean Acc. (mean)", "Patch", "Single-Pix", "Blend-R†",
                            "Avg. ASR plain", "Avg. ASR boosted†"]
    assert list(r) == ["Defense", "none", "badloss"]
    single = df[df["scenario"] == "single-" + df["attack"]]
    for d in ("none", "badloss"):
        g = single[single["defense"] == d]
        per_seed = g.groupby("seed").agg(clean=("clean_accuracy", "mean"), plain=("asr", "mean"), paper=("asr_paper", "mean"))
        assert r[d][1] == "3" and r[d][2] == fmt(per_seed["clean"])
        assert r[d][3] == fmt(g.loc[g["attack"] == "patch", "asr_paper"])
        assert r[d][6] == fmt(per_seed["plain"]) and r[d][7].rstrip("‡") == fmt(per_seed["paper"])
    # Undefended Blend-R: plain ~0.9 but boosted 0.1-0.3 -> marked, with the plain mean beside it.
    g = single[(single["defense"] == "none") & (single["attack"] == "blend_random")]
    assert r["none"][5] == f"{fmt(g['asr_boosted'])}‡ (plain {g['asr'].mean() * 100:.2f})"
    assert "‡" not in r["badloss"][5]  # boosted and plain both low: no gap
    assert "‡ the boosted-trigger ASR is more than 20 points below" in md.split("single attack (Table 1 shape)")[1].split("###")[0]
    assert aggregate.understated([0.987], [0.198]) and not aggregate.understated([0.5], [0.31])


def test_rows_per_final_architecture(tmp_path):
    paths = [cell(tmp_path, defense="badloss_r18", arch="resnet18", clean=0.80),
             cell(tmp_path, defense="none_r18", arch="resnet18", none=True, clean=0.85),
             cell(tmp_path, defense="none", clean=0.95), cell(tmp_path, defense="badloss", clean=0.90)]
    df = aggregate.collect(paths)
    assert df.drop_duplicates("defense").set_index("defense")["arch"].to_dict() == {
        "none": "smallcnn", "badloss": "smallcnn", "badloss_r18": "resnet18", "none_r18": "resnet18"}
    # Grouped by architecture (the `none` defense's first), each group's undefended model first.
    assert aggregate.defense_order(df) == ["none", "badloss", "none_r18", "badloss_r18"]
    rows = table_rows(aggregate.markdown_tables(df), "digits — multi")
    assert rows["Defense"][:4] == ["Defense", "Arch.", "n", "Clean Acc."]
    assert rows["none_r18"][1:4] == ["resnet18", "1", "85.00"] and rows["badloss"][1:4] == ["smallcnn", "1", "90.00"]
    # One architecture: no Arch. column.
    one = table_rows(aggregate.markdown_tables(aggregate.collect(paths[2:])), "digits — multi")
    assert one["Defense"][1] == "n"


def _planted_rejection(rng, n_classes=20):
    """Per-class counts with distinct class sizes (so the tails are unambiguous) and random rejections."""
    sizes = rng.permutation(np.arange(30, 30 + 7 * n_classes, 7))
    by_class = {}
    for c, size in enumerate(sizes):
        clean = int(size - rng.integers(0, 5))
        by_class[str(c)] = [int(size), clean, int(rng.integers(0, clean + 1))]
    n_p = 100
    return {"by_class": by_class, "poisoned": [n_p, int(rng.integers(0, n_p + 1))]}, sizes


def test_rejection_table_equals_a_direct_computation(tmp_path):
    """Planted per-class counts over three seeds: the table's tails, overall and poisoned rates equal
    a direct computation (largest/smallest 10% of 20 classes = 2 classes each; mean of their rates)."""
    rng = np.random.default_rng(5)
    paths, direct = [], {"top": [], "bottom": [], "clean": [], "poisoned": []}
    for seed in range(3):
        rej, sizes = _planted_rejection(rng)
        p = cell(tmp_path, seed=seed)
        m = read_json(p)
        m["rejection"] = rej
        write_json(p, m)
        paths.append(p)
        order = np.argsort(-sizes)
        rate = {int(c): v[2] / v[1] for c, v in rej["by_class"].items()}
        direct["top"].append(np.mean([rate[c] for c in order[:2]]))
        direct["bottom"].append(np.mean([rate[c] for c in order[-2:]]))
        direct["clean"].append(sum(v[2] for v in rej["by_class"].values()) / sum(v[1] for v in rej["by_class"].values()))
        direct["poisoned"].append(rej["poisoned"][1] / rej["poisoned"][0])
    paths += [cell(tmp_path, defense="none", seed=s) for s in range(3)]  # removes nothing: no row
    md = aggregate.table_sections(aggregate.collect(paths))["rejection"]
    md = "\n".join(md)
    assert "largest and the smallest 2 of 20 classes" in md
    rows = table_rows(md, "digits — multi: rejection by class size")
    assert set(rows) == {"Defense", "badloss"}
    assert rows["Defense"][4:] == ["Largest 2 classes", "Smallest 2 classes", "Poisoned rejected"]
    assert rows["badloss"][1] == "3"
    assert rows["badloss"][2] == fmt([570 / 1437] * 3)
    assert rows["badloss"][3:] == [fmt(direct[k]) for k in ("clean", "top", "bottom", "poisoned")]


def test_rejection_counts_from_a_plan():
    """The evaluate stage's counts: per original class [examples, clean, clean rejected]; poisoned [n, rejected]."""
    from poisongrid.stages import rejection_counts

    man = pd.DataFrame({"orig_label": [0, 0, 0, 1, 1, 2], "attack": pd.array([None, None, "patch", None, "blend_random", None],
                                                                             dtype="string")})
    w = np.array([0, 1, 0, 0.5, 1, 0], dtype=np.float32)
    assert rejection_counts(man, w) == {"by_class": {"0": [3, 2, 1], "1": [2, 1, 0], "2": [1, 1, 1]}, "poisoned": [2, 1]}
    got = aggregate.class_rejection(rejection_counts(man, w), fraction=0.34)  # one class per tail
    assert got["clean_rejected_top"] == 0.5 and got["clean_rejected_bottom"] == 1.0
    assert got["clean_rejected"] == 0.5 and got["poisoned_rejected"] == 0.5 and got["size_bottom"] == 1


def test_every_paper_number_names_a_cell_of_its_preset():
    """Each row of papers/numbers.csv belongs to a cell its preset runs: the dataset, the scenario,
    a defense that runs there, an attack of the dataset."""
    import yaml

    from poisongrid import config, papers

    numbers = papers.load()
    assert len(numbers) > 1000 and numbers["value"].between(0, 100).all()
    for preset, rows in numbers.groupby("preset"):
        cfg = config.validate(yaml.safe_load(open(f"configs/{preset}.yaml")), deep=False)
        assert cfg["paper_numbers"] == preset
        cells = {(c["dataset"], c["scenario"], c["defense"]) for c in config.cells(cfg)}
        for r in rows.itertuples():
            ds = cfg["datasets"][r.dataset]
            if isinstance(r.attack, str):
                assert r.attack in ds["attacks"], (preset, r.attack)
            if isinstance(r.scenario, str):
                assert (r.dataset, r.scenario, r.defense) in cells, (preset, r.table, r.row, r.column)
            else:  # an average over the single-attack scenarios
                assert any(c[0] == r.dataset and c[2] == r.defense and c[1].startswith("single-") for c in cells)


def test_paper_numbers_go_beside_the_measured_cells(tmp_path):
    """Our value (mean over seeds), the paper's, the difference; a cell further off than the seed
    spread plus 5 points is marked. Table 1's average is per seed over the attacks alone."""
    from poisongrid import papers

    paths = []
    for seed, clean in ((0, 0.90), (1, 0.92)):
        for a, asr in (("patch", 0.90), ("single_pixel", 0.60)):
            paths.append(cell(tmp_path, dataset="cifar10", scenario=f"single-{a}", seed=seed, defense="none", clean=clean,
                              asr=(asr, asr, asr), boosted=asr))
    paths.append(cell(tmp_path, dataset="cifar10", scenario="multi", defense="badloss", clean=0.50, seed=0))
    df = aggregate.collect(paths)
    cmp = papers.compare(df, "badloss-paper").set_index(["table", "scenario", "defense", "column"])
    patch = cmp.loc[("Table 1", "single-patch", "none", "Clean Accuracy: Patch")]
    # Paper: 92.86; ours 91 ± 1.41 over two seeds: off by 1.86 < 1.41 + 5.
    assert patch["ours"] == pytest.approx(91.0) and patch["paper_value"] == 92.86 and patch["n"] == 2
    assert patch["diff"] == pytest.approx(91.0 - 92.86) and not patch["off"]
    asr = cmp.loc[("Table 1", "single-single_pixel", "none", "Attack Success Rate: Single-Pix")]
    assert asr["ours"] == pytest.approx(60.0) and asr["paper_value"] == 67.12 and asr["off"]  # 7.12 > 0 + 5
    avg = cmp.loc[("Table 1", "", "none", "Attack Success Rate: Avg.")]
    assert avg["ours"] == pytest.approx(75.0)  # (90 + 60) / 2 over the two attacks this grid ran alone
    clean = cmp.loc[("Table 2", "multi", "badloss", "Clean Acc.")]
    assert clean["ours"] == pytest.approx(50.0) and clean["off"]
    md = aggregate.markdown_tables(df, papers.compare(df, "badloss-paper"))
    # The answer first, then the papers' numbers before every other table.
    assert md.startswith("### cifar10 — the answer: all attacks at once (multi)")
    assert md.index("### BaDLoss paper, Table 1: its numbers beside ours") < md.index("### cifar10 — multi")
    row = next(line for line in md.splitlines() if "Attack Success Rate: Single-Pix" in line and "| none |" in line)
    assert pct(row)[-4:] == ["60.00 ± 0.00", "2", "67.12", "-7.12 ‼"]


def test_runs_below_the_reference_budget_are_marked(tmp_path):
    p = cell(tmp_path, defense="nc")
    m = read_json(p)
    m["budget"] = {"defense": "mask search on 5,000 of 50,000 training images",
                   "attacks": {"single_pixel": "learned with epochs 5 (reference 200)"}}
    write_json(p, m)
    md = aggregate.markdown_tables(aggregate.collect([p, cell(tmp_path, defense="none")]))
    rows = table_rows(md, "digits — multi")
    assert "nc§" in rows and "none" in rows
    header = next(line for line in md.split("### digits — multi\n")[1].splitlines() if line.startswith("| Defense"))
    assert "Single-Pix§" in pct(header) and "Patch" in pct(header)
    notes = md.split("### digits — § below the references' budgets\n")[1]
    assert "- defense nc: mask search on 5,000 of 50,000 training images" in notes
    assert "- attack Single-Pix: learned with epochs 5 (reference 200)" in notes
