import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from poisongrid import aggregate
from poisongrid.errors import ArtifactError
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
    assert "### digits — multi" in md and "2 seeds, mean ± std" in md
    block = md.split("### digits — multi\n")[1].split("###")[0]
    header = pct(next(line for line in block.splitlines() if line.startswith("| Defense")))
    assert header == ["Defense", "Clean Acc.", "Patch", "Single-Pix", "Blend-R†", "Avg. ASR", "AUROC", "Recall (removed)"]
    rows = [pct(line)[0] for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["none", "badloss"]
    assert "† ASR measured with the blended trigger boosted 2×" in block
    r = table_rows(md, "digits — multi")
    assert r["none"][1:5] == ["95.00 ± 0.00", "98.00 ± 0.00", "90.00 ± 0.00", "99.00 ± 0.00"]
    assert r["badloss"][1] == "92.00 ± 1.41" and r["badloss"][2] == "3.00 ± 1.41"  # sample std over seeds
    assert r["badloss"][4] == "20.00 ± 0.00" and r["badloss"][6:] == ["91.00 ± 0.00", "95.00 ± 0.00"]
    assert r["none"][6:] == ["–", "–"]
    block = md.split("### digits — plain-trigger ASR\n")[1]
    plain = [pct(line) for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [p[:2] for p in plain] == [["multi", "none"], ["multi", "badloss"]]
    assert plain[0][4] == "30.00 ± 0.00" and plain[1][4] == "10.00 ± 0.00"  # un-boosted Blend-R


def test_single_seed_without_std_and_rreject_order(tmp_path):
    paths = [cell(tmp_path, defense=f"badloss_r{int(r * 100)}", r=r) for r in (0.6, 0.2)]
    paths.append(cell(tmp_path, defense="none", asr=(0.98, 0.9, 0.3)))
    df = aggregate.collect(paths)
    assert aggregate.defense_order(df) == ["none", "badloss_r20", "badloss_r60"]
    r = table_rows(aggregate.markdown_tables(df), "digits — multi")
    assert r["none"][2] == "98.00" and "±" not in "".join(r["none"])


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
    write_table(base / "poison" / "manifest.parquet", pa.Table.from_pandas(man, preserve_index=False), "manifest")
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
    kinds = ("asr", "rreject", "capacity", "trajectories", "teacher")
    assert all(is_png(p) for k in kinds for p in w[k])
    assert sorted(p.name for p in figs.iterdir()) == sorted(p.name for k in kinds for p in w[k])

    assert w["summary"] == [out / "summary.csv", out / "summary.parquet"]
    csv = pd.read_csv(out / "summary.csv")
    assert len(csv) == 3 * (2 + 4 + 2 + 4) and list(csv.columns) == aggregate.COLUMNS
    table, _ = read_table(out / "summary.parquet", "summary")
    assert table.num_rows == len(csv)
    md = (out / "tables.md").read_text()
    assert w["tables"] == [out / "tables.md"] and "### digits — patch" in md and "98.00 ± 0.00" in md


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
    assert rows["badloss"][1] == "1.50 ± 0.71 / 30.00 ± 0.00"
    assert rows["none"][1].endswith("/ 90.00 ± 0.00")
    cost = table_rows(md, "digits — cost of each defense")
    # Only the single cells carry a cost record: badloss 9 model + 30 final epochs, 74/84 s total.
    assert cost["badloss"][1:4] == ["9", "30", "39"] and cost["badloss"][-1] == "1.3 ± 0.1"
    assert cost["none"][1:4] == ["30", "0", "30"]
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
    assert rows["No attack"] == ["No attack", "96.00", "–", "94.00", "–"]
    assert rows["Patch"] == ["Patch", "95.00", "99.00", "93.00", "2.00"]
    assert rows["Single-Pix"][2] == "98.00" and rows["Single-Pix"][4] == "5.00"
    clean_rows = table_rows(md, "digits — clean")
    assert clean_rows["none"][1] == "96.00" and clean_rows["none"][-1] == "–"
    assert not any("clean" in p.name for p in out["asr"])


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
    assert rows["Defense"][:3] == ["Defense", "Arch.", "Clean Acc."]
    assert rows["none_r18"][1:3] == ["resnet18", "85.00"] and rows["badloss"][1:3] == ["smallcnn", "90.00"]
    # One architecture: no Arch. column.
    one = table_rows(aggregate.markdown_tables(aggregate.collect(paths[2:])), "digits — multi")
    assert one["Defense"][1] == "Clean Acc."
