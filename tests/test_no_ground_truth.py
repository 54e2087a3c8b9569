"""No defense reads the ground truth: every registered detector scores a real poisoned digits cell
identically when the manifest's ground-truth columns (attack, orig_label, target) are shuffled,
and when the poisoned set is stored dense (every row in poisoned.npz) instead of sparse (the
poisoned rows only); every remedy but the `oracle` reference plans the same weights."""

import numpy as np
import pyarrow as pa
import pytest
import yaml

import planted
from poisongrid import config, paths, poisoning, stages
from poisongrid.detectors import DETECTORS, read_scores
from poisongrid.io import read_table, save_npz, to_numpy, write_table
from poisongrid.jobs import run_job
from poisongrid.remedies import REMEDIES

GROUND_TRUTH = ["attack", "orig_label", "target"]


def _tiny_full_config() -> dict:
    """configs/demo-full.yaml (every detector and remedy) at 16 px with a few epochs everywhere."""
    cfg = yaml.safe_load(open("configs/demo-full.yaml"))
    ds = cfg["datasets"]["digits"]
    ds.update(image_size=16, epochs=2)
    ds["attacks"] = {"patch": {"ratio": 0.05}, "blend_random": {"ratio": 0.04, "alpha": 0.1}}
    for m in cfg["defender_models"].values():
        if "epochs" in m:
            m["epochs"] = 1
    d = cfg["detectors"]
    d["nc"].update(epochs=1, search_images=200)
    d["cd"].update(steps=2)
    d["freq"].update(epochs=1)
    d["pss"].update(intraclass_epochs=1)
    return config.validate(cfg)


@pytest.mark.slow
def test_scores_and_plans_ignore_shuffled_ground_truth(tmp_path):
    cfg = _tiny_full_config()
    root = str(tmp_path / "r")
    cell = dict(dataset="digits", scenario="multi", seed=0)
    _, _, poisoned = run_job(cfg, "poison", root, **cell)
    run_job(cfg, "bonafide", root, **cell)
    models = {det.get("model") for det in cfg["detectors"].values()} | {"attacked"}
    for m in sorted(models - {None}):
        run_job(cfg, "pretrain", root, **cell, model=m)
    run_job(cfg, "features", root, **cell, model="attacked")

    # The same manifest with every ground-truth column permuted (labels and bona fide flags kept).
    man_path = poisoned["manifest"]
    table, meta = read_table(man_path, poisoning.MANIFEST_KIND)
    df = table.to_pandas()
    bona = read_table(paths.path("bona_fide", root, **cell, bona="default"), "bona_fide")[0]
    mask = np.zeros(len(df), bool)
    mask[np.searchsorted(df["index"].to_numpy(), to_numpy(bona.column("index")))] = to_numpy(bona.column("bona_fide"))
    shuffled = planted.shuffle_ground_truth(df, mask, seed=0, columns=GROUND_TRUTH)
    fake = tmp_path / "shuffled" / "manifest.parquet"
    write_table(fake, pa.Table.from_pandas(shuffled, preserve_index=False), poisoning.MANIFEST_KIND,
                {k: v for k, v in meta.items() if k != "kind"})

    # The same poisoned training set stored dense: every row in the images file, poisoned or not.
    ds = stages.get_dataset(config.stage_spec(cfg, "poison", "digits", "multi", 0))
    full = poisoning.training_images(ds, poisoned["images"], len(df)).materialize()
    assert not np.array_equal(full, ds.train.images)
    dense = tmp_path / "dense" / "poisoned.npz"
    dense.parent.mkdir()
    save_npz(dense, index=np.arange(len(full), dtype=np.int64), images=full)

    types = set()
    for name, det in cfg["detectors"].items():
        types.add(det["type"])
        _, inp_s, out_s = run_job(cfg, "score", root, **cell, detector=name)
        spec = config.stage_spec(cfg, "score", "digits", "multi", 0, detector=name)
        a = read_scores(out_s["out"])[0]
        variants = {"shuffled ground truth": {"manifest": str(fake)}}
        if "images" in inp_s:
            variants["dense storage"] = {"images": str(dense)}
        for what, change in variants.items():
            other = tmp_path / "again" / f"{name}-{what.replace(' ', '_')}.parquet"
            stages.score(spec, {**inp_s, **change}, {"out": str(other)})
            b = read_scores(other)[0]
            np.testing.assert_array_equal(a["score"].to_numpy(), b["score"].to_numpy(), err_msg=f"{name}, {what}")
    assert types == set(DETECTORS.names())

    remedies = set()
    for name, d in cfg["defenses"].items():
        remedies.add(d["remedy"])
        _, inp_p, out_p = run_job(cfg, "plan", root, **cell, defense=name)
        spec = config.stage_spec(cfg, "plan", "digits", "multi", 0, defense=name)
        other = tmp_path / "again" / f"plan-{name}.parquet"
        stages.plan(spec, {**inp_p, "manifest": str(fake)}, {"out": str(other)})
        a, b = read_table(out_p["out"], "plan")[0].to_pandas(), read_table(other, "plan")[0].to_pandas()
        np.testing.assert_array_equal(a["weight"].to_numpy(), b["weight"].to_numpy(), err_msg=name)
    assert remedies == set(REMEDIES.names()) - {"oracle"}
