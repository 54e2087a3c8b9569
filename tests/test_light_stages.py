"""The light jobs (poison, bona fide draw, score and plan of the trajectory detectors, validate, estimate) run in a
fresh process exactly as the workflow runs them, on a small real cell, and never import torch; the
score and plan jobs not even pandas. Their outputs are checked against independent computations."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import poisongrid as poisongrid_pkg
from poisongrid import config, paths, poisoning, provenance, trajectories
from poisongrid.data import load_dataset
from poisongrid.io import from_numpy, read_table, save_npz, to_numpy

# Runs the CLI as the console script does, then prints which heavy modules the process imported.
RUN = ("import json, sys\nfrom poisongrid.cli import main\nrc = main(sys.argv[1:])\n"
       "print('LOADED=' + json.dumps(sorted(m for m in ('torch', 'pandas', 'scipy', 'sklearn', 'matplotlib') "
       "if m in sys.modules)))\nsys.exit(rc)")

EPS = 0.1
CFG = {
    "results": "results", "data_dir": "data", "device": "cpu", "threads": 1, "seeds": [0],
    "bona_fide": {"n_clean": 60},
    "defender_models": {"pretrain": {"r_epoch": 0.3, "augment": "none", "record": "train"},
                        "teacher": {"model": "mobilenetv2_s", "epochs": 2, "augment": "none", "record": "final"},
                        "backdoored": {"epochs": 2}},
    "detectors": {"badloss": {"type": "badloss", "k": 5, "log_losses": True}, "lfd": {"type": "teacher_loss"}},
    "defenses": {"none": {"remedy": "none"}, "badloss": {"detector": "badloss", "remedy": "remove", "r_reject": 0.3},
                 "lfd": {"detector": "lfd", "remedy": "reweight", "alpha": 0.25, "beta": 0.001},
                 "oracle": {"remedy": "oracle"}, "fine_prune": {"remedy": "fine_prune"},
                 "cbd": {"remedy": "cbd", "detector": "badloss"}},
    "datasets": {"digits": {
        "image_size": 16, "model": "smallcnn", "epochs": 4, "scenarios": ["multi"],
        "attacks": {"patch": {"ratio": 0.04}, "frequency": {"ratio": 0.03, "magnitude": 30},
                    "narcissus": {"ratio": 0.02, "eps": EPS, "learn": {"model": "smallcnn", "epochs": 1, "rounds": 1}}},
    }},
}
CELL = {"dataset": "digits", "scenario": "multi", "seed": 0}


# The package under test, whatever the working directory of the child process.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(poisongrid_pkg.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}


def poisongrid(cwd: Path, *argv: str) -> tuple[str, list[str]]:
    p = subprocess.run([sys.executable, "-c", RUN, *argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"poisongrid {' '.join(argv[:2])} failed:\n{p.stderr[-3000:]}"
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("LOADED=")][-1]
    return p.stdout, json.loads(line[len("LOADED="):])


def spec_args(cfg: dict, stage: str, **extra) -> list[str]:
    spec = config.stage_spec(cfg, stage, "digits", seed=0, scenario="multi", **extra)
    cell = [f"--{k}={v}" for k, v in {**CELL, **extra}.items()]  # as the rules give each job its files
    return [stage, "--spec", json.dumps(spec), "--results", "results", *cell]


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    """A poisoned cell (a learned trigger among its attacks) and the loss files of its two defender
    models, laid out as the workflow lays them out."""
    root = tmp_path_factory.mktemp("light")
    (root / "c.yaml").write_text(yaml.safe_dump(CFG))
    cfg = config.load(root / "c.yaml", deep=False)
    ds = load_dataset("digits", data_dir=root / "data", image_size=16)  # also fills the digits cache
    # What the trigger stage would have learned for narcissus: a trigger within its budget, with provenance.
    target = poisoning.draw_target("narcissus", cfg["datasets"]["digits"]["attacks"]["narcissus"], ds.train.labels, 10, 0)
    trig = np.random.default_rng(0).uniform(-EPS, EPS, ds.image_shape).astype(np.float32)
    save_npz(root / paths.path("trigger", "results", dataset="digits", attack="narcissus", seed=0), trigger=trig,
             surrogate_pool=np.int64(10), target=np.int64(target), dataset=np.array("digits"), seed=np.int64(0),
             attack=np.array("narcissus"), image_shape=np.array(ds.image_shape, dtype=np.int64))
    _, loaded = poisongrid(root, *spec_args(cfg, "poison"))
    _, bona_loaded = poisongrid(root, *spec_args(cfg, "bonafide", bona="default"))
    man_path = root / paths.path("manifest", "results", **CELL)
    man, meta = poisoning.read_manifest(man_path, root / paths.path("bona_fide", "results", **CELL, bona="default"))
    losses = {}
    for model, epochs in (("pretrain", 4), ("teacher", 1)):
        rng = np.random.default_rng(len(model))
        loss = rng.gamma(2.0, 0.5, (epochs, len(man))).astype(np.float32)
        loss[:, man["attack"].notna().to_numpy()] *= 0.1  # poisoned examples are learned fast
        losses[model] = loss
        trajectories.write(root / paths.path("losses", "results", **CELL, model=model), loss, {
            "cell": provenance.of_role(meta["cell"], model=model), "model_name": model, "model": "smallcnn",
            "epochs_run": epochs, "epochs_recorded": epochs, "accepted_epochs": list(range(epochs)),
            "n_examples": len(man), "record": "train", "wall_time_s": 1.0})
    return {"root": root, "cfg": cfg, "man": man, "losses": losses, "poison_loaded": loaded, "bona_loaded": bona_loaded}


def test_poison_with_a_learned_trigger_imports_neither_torch_nor_pandas(cell):
    """The manifest is built as Arrow; scipy's FFT only for the frequency trigger."""
    assert "torch" not in cell["poison_loaded"] and "pandas" not in cell["poison_loaded"]
    man = cell["man"]
    counts = man["attack"].value_counts().to_dict()
    n = len(man)
    assert counts == {"patch": int(n * 0.04), "frequency": int(n * 0.03), "narcissus": int(n * 0.02)}
    # The narcissus rows carry the artifact's trigger: poisoned image = round(clean + 255 * trigger), clipped.
    ds = load_dataset("digits", data_dir=cell["root"] / "data", image_size=16)
    z = np.load(cell["root"] / paths.path("poisoned", "results", **CELL))
    trig = np.load(cell["root"] / paths.path("trigger", "results", dataset="digits", attack="narcissus", seed=0))["trigger"]
    rows = np.flatnonzero((man["attack"] == "narcissus").fillna(False).to_numpy(dtype=bool))
    got = z["images"][np.searchsorted(z["index"], rows)]
    want = np.clip(np.rint(ds.train.images[rows].astype(np.float32) + trig * np.float32(255)), 0, 255)
    assert np.array_equal(got, want.astype(np.uint8))


def test_bona_fide_draw_imports_neither_torch_nor_pandas(cell):
    assert cell["bona_loaded"] == []
    man = cell["man"]
    assert man["bona_fide"].sum() == 60 and not (man["bona_fide"] & man["attack"].notna()).any()


def test_trajectory_scores_import_neither_torch_nor_pandas(cell):
    root, man = cell["root"], cell["man"]
    for det in ("badloss", "lfd"):
        _, loaded = poisongrid(root, *spec_args(cell["cfg"], "score", detector=det))
        assert loaded == [], det
    table, _ = read_table(root / paths.path("scores", "results", **CELL, detector="badloss"), "scores")
    scores = to_numpy(table["score"])[np.argsort(to_numpy(table["index"]))]
    # Independent kNN: log mean distance to the 5 nearest bona fide log-loss trajectories.
    t = np.log(np.maximum(cell["losses"]["pretrain"].T.astype(np.float64), 1e-6))
    ref = t[man["bona_fide"].to_numpy()]
    d = np.sqrt(((t[:, None, :] - ref[None]) ** 2).sum(-1))
    want = np.log(np.sort(d, axis=1)[:, :5].mean(1) + 1e-8)
    assert np.allclose(scores, want, atol=1e-3)
    table, _ = read_table(root / paths.path("scores", "results", **CELL, detector="lfd"), "scores")
    assert np.array_equal(to_numpy(table["score"]), -cell["losses"]["teacher"][0].astype(np.float64))


def test_plans_import_neither_torch_nor_pandas(cell):
    root, man = cell["root"], cell["man"]
    for d in ("none", "badloss", "lfd", "oracle", "fine_prune", "cbd"):  # the last two train with torch, plan without
        _, loaded = poisongrid(root, *spec_args(cell["cfg"], "plan", defense=d))
        assert loaded == [], d
    plan = {d: read_table(root / paths.path("plan", "results", **CELL, defense=d), "plan")[0]
            for d in ("badloss", "oracle", "fine_prune")}
    w = to_numpy(plan["badloss"]["weight"])
    s = to_numpy(plan["badloss"]["score"])
    bona = man["bona_fide"].to_numpy()
    # r_reject 0.3: the round(0.3 N) highest scores among the non-bona-fide examples get weight 0.
    k = round(0.3 * len(man))
    cut = np.sort(s[~bona])[::-1][k - 1]
    assert (w == 0).sum() == k and not (w[bona] == 0).any() and (s[w == 0] >= cut).all()
    assert np.array_equal(to_numpy(plan["oracle"]["weight"]), man["attack"].isna().to_numpy().astype(np.float32))
    assert np.array_equal(to_numpy(plan["fine_prune"]["weight"]), np.ones(len(man), np.float32))  # removes none


def test_plan_from_the_config_and_validate_estimate_import_no_torch(cell):
    root = cell["root"]
    out = root / "by-hand.parquet"
    _, loaded = poisongrid(root, "plan", "--config", "c.yaml", "--dataset", "digits", "--scenario", "multi", "--seed", "0",
                           "--defense", "badloss", "--out", str(out))
    assert loaded == []
    a = read_table(out, "plan")[0]
    b = read_table(root / paths.path("plan", "results", **CELL, defense="badloss"), "plan")[0]
    assert a.equals(b)
    # The LfD teacher check counts model parameters (torch) once, then reads them from the data cache.
    poisongrid(root, "validate", "c.yaml")
    sizes = json.loads((root / "data" / ".poisongrid-cache" / "model-sizes.json").read_text())
    from poisongrid.models import parameter_count

    assert sorted(sizes.values()) == sorted([parameter_count("mobilenetv2_s", 10, 16), parameter_count("smallcnn", 10, 16)])
    text, loaded = poisongrid(root, "validate", "c.yaml")
    assert "valid" in text and "torch" not in loaded and "pandas" not in loaded
    text, loaded = poisongrid(root, "estimate", "--configfile", "c.yaml")
    assert "total:" in text and "torch" not in loaded


def test_a_stale_model_size_is_never_read(tmp_path):
    from poisongrid import model_sizes

    n = model_sizes.parameter_count("smallcnn", 10, 16, tmp_path)
    f = tmp_path / "model-sizes.json"
    sizes = json.loads(f.read_text())
    # Counts made by other model code (another models.py or torch) are keyed differently and ignored.
    f.write_text(json.dumps({"0000000000000000/" + k.split("/", 1)[1]: v + 1 for k, v in sizes.items()}))
    assert model_sizes.parameter_count("smallcnn", 10, 16, tmp_path) == n


def test_digits_cache_gives_the_same_arrays_without_sklearn(tmp_path):
    fresh = load_dataset("digits", data_dir=tmp_path, image_size=16)
    code = ("import sys, numpy as np\nfrom poisongrid.data import load_dataset\n"
            f"ds = load_dataset('digits', data_dir={str(tmp_path)!r}, image_size=16)\n"
            "np.savez(sys.argv[1], a=ds.train.images, b=ds.train.labels, c=ds.test.images, d=ds.test.labels)\n"
            "print('sklearn' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o.npz")], env=ENV, capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "False"
    z = np.load(tmp_path / "o.npz")
    for k, v in zip("abcd", (fresh.train.images, fresh.train.labels, fresh.test.images, fresh.test.labels)):
        assert z[k].dtype == v.dtype and np.array_equal(z[k], v)


def test_arrow_columns_round_trip_like_pyarrow():
    import pyarrow as pa

    rng = np.random.default_rng(0)
    for x in (np.arange(9, dtype=np.int64), rng.random(7), rng.random(5).astype(np.float32), rng.random(11) > 0.5,
              np.zeros(0, dtype=bool)):
        a = from_numpy(x)
        assert a.equals(pa.array(x))
        back = to_numpy(pa.chunked_array([a, a.slice(1)]))
        assert back.dtype == x.dtype and np.array_equal(back, np.concatenate([x, x[1:]]))
    assert np.isnan(to_numpy(pa.array([1.0, None]))[1])


def test_zoo_declares_every_registered_name():
    from poisongrid import models, training, zoo

    for reg, module in ((zoo.MODELS, models), (zoo.OPTIMIZERS, training), (zoo.AUGMENTS, training)):
        assert set(reg._items) <= set(reg._lazy), f"{reg.kind}: declare {sorted(set(reg._items) - set(reg._lazy))} in zoo.py"
        for name in reg._lazy:
            assert reg.get(name) is not None


@pytest.mark.parametrize("preset", ["badloss-architectures.yaml", "adaptive-digits.yaml"])
def test_validating_final_architectures_and_adaptive_attacks_imports_no_torch(preset, tmp_path):
    """A defense's `arch` and the adaptive attack's surrogate augmentation are checked by name
    (zoo), as every other model and augmentation: validating these presets needs no torch."""
    repo = Path(poisongrid_pkg.__file__).parents[2]
    text, loaded = poisongrid(tmp_path, "validate", "--no-data", str(repo / "configs" / preset))
    assert "valid" in text and "torch" not in loaded


@pytest.mark.parametrize("how", ["over_budget", "other_image_size"])
def test_a_trigger_over_its_budget_or_of_another_size_is_refused_naming_the_file(cell, tmp_path, how):
    """A learned trigger 4x over its l-inf budget, or made for other images, stops poisoning with one
    line naming the trigger file (not a config key)."""
    import shutil

    root = tmp_path / "cell"
    shutil.copytree(cell["root"] / "results", root / "results")
    (root / "data").symlink_to(cell["root"] / "data")
    path = root / paths.path("trigger", "results", dataset="digits", attack="narcissus", seed=0)
    z = dict(np.load(path))
    if how == "over_budget":
        z["trigger"] = np.full_like(z["trigger"], 4 * EPS)
    else:
        z["image_shape"] = np.array([3, 32, 32], dtype=np.int64)
    z.pop("_digests", None)
    save_npz(path, **z)
    manifest = root / paths.path("manifest", "results", **CELL)
    before = manifest.stat().st_mtime_ns
    p = subprocess.run([sys.executable, "-c", RUN, *spec_args(cell["cfg"], "poison")], cwd=root, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and str(path.relative_to(root)) in err[0] and "Traceback" not in p.stderr, p.stderr
    assert ("budget" in err[0] or "eps" in err[0]) if how == "over_budget" else "image shape" in err[0], err[0]
    assert manifest.stat().st_mtime_ns == before  # nothing was written
