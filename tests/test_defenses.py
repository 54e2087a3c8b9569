"""The defense contract: remedies turn scores into per-example weights; detectors and remedies
never read the ground truth; the final training follows the plan."""
import copy
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

import planted
from planted import files, write_manifest
from poisongrid import config, paths, poisoning, stages, trajectories
from poisongrid.detectors import DETECTORS, read_scores
from poisongrid.jobs import cell_jobs, run_job
from poisongrid.remedies import REMEDIES, lfd_weights

RUNTIME = {"device": "cpu", "threads": 1}


def test_lfd_weights_match_eq6_by_hand():
    loss = np.array([0.01, 0.05, 0.2, 1.0, 2.0, 4.0, 0.02, 3.0, 0.5, 1.5])
    # alpha 0.3: gamma = sorted(loss)[3] = 0.2; max = 4.0.
    w = lfd_weights(loss, alpha=0.3, beta=0.01)
    gamma, top = 0.2, 4.0
    want = [0.01 * (0.01 - gamma) / (top - gamma), 0.01 * (0.05 - gamma) / (top - gamma), 0.0, 1.0 / 4, 2.0 / 4, 1.0,
            0.01 * (0.02 - gamma) / (top - gamma), 3.0 / 4, 0.5 / 4, 1.5 / 4]
    np.testing.assert_allclose(w, want, rtol=1e-6)
    assert (w[loss < gamma] < 0).all() and (w[loss > gamma] > 0).all() and w.max() == 1.0
    # The lowest loss gets the most negative weight, never below -beta * gamma / (max - gamma).
    assert w.argmin() == loss.argmin() and w.min() >= -0.01 * gamma / (top - gamma) - 1e-9
    # Eq. 5 (plain gradient ascent): the batch mean of w * l is E_non[l] - E_cand[l].
    a = lfd_weights(loss, alpha=0.3, beta=0.01, mode="ascent")
    cand = loss <= gamma
    np.testing.assert_allclose(np.mean(a * loss), loss[~cand].mean() - loss[cand].mean(), rtol=1e-6)


def _manifest(n=200, seed=0):
    rng = np.random.default_rng(seed)
    attack = np.full(n, None, dtype=object)
    attack[:20] = "patch"
    bona = np.zeros(n, bool)
    bona[150:180] = True
    return pd.DataFrame({"index": np.arange(n, dtype=np.int64), "label": rng.integers(0, 4, n).astype(np.int64),
                         "orig_label": rng.integers(0, 4, n).astype(np.int64), "attack": pd.array(attack, dtype="string"),
                         "target": np.where(pd.isna(attack), -1, 2).astype(np.int64), "bona_fide": bona})


CELL = {"dataset": "digits", "scenario": "single-patch", "seed": 0}
CELL_MULTI = {"dataset": "digits", "scenario": "multi", "seed": 0}


def _write_manifest(path, man):
    write_manifest(path, man, {"scenario": "single-patch", "attacks": {}, "seed": 0, "cell": CELL})


def _write_losses(path, n, epochs, poisoned, seed=0):
    rng = np.random.default_rng(seed)
    curve = np.linspace(2.0, 0.5, epochs)[:, None] * rng.lognormal(0, 0.1, (epochs, n))
    curve[:, poisoned] *= 0.02  # planted: learned far faster
    trajectories.write(path, curve.astype(np.float32), {"epochs_recorded": epochs, "accepted_epochs": list(range(epochs)),
                                                        "skipped_epochs": [], "n_examples": n, "model_name": "m",
                                                        "cell": {**CELL, "model": "m"},
                                                        "model": "resnet_s", "wall_time_s": 1.0})


@pytest.mark.parametrize("dtype, params", [("badloss", {"k": 10}), ("teacher_loss", {})])
def test_detectors_rank_planted_poison_and_never_read_ground_truth(tmp_path, dtype, params):
    man = _manifest()
    poisoned = man["attack"].notna().to_numpy()
    _write_losses(tmp_path / "t.parquet", len(man), 4, poisoned)
    outs = []
    for i, m in enumerate([man, planted.shuffle_ground_truth(man)]):
        _write_manifest(tmp_path / f"m{i}.parquet", m)
        spec = {"detector": "d", "type": dtype, "model": "m", **params}
        stages.score(spec, {**files(tmp_path / f"m{i}.parquet"), "trajectories": tmp_path / "t.parquet"},
                     {"out": tmp_path / f"s{i}.parquet"})
        outs.append(read_scores(tmp_path / f"s{i}.parquet"))
    # Shuffling the ground-truth columns changes nothing.
    np.testing.assert_array_equal(outs[0][0]["score"], outs[1][0]["score"])
    s = outs[0][0].sort_values("index")["score"].to_numpy()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(poisoned, s) > 0.95
    meta = outs[0][1]
    assert meta["wall_time_s"] >= 0 and meta["defender_model"]["model"] == "resnet_s"
    if dtype == "teacher_loss":
        assert meta["negated_loss"] is True
        np.testing.assert_allclose(-s, trajectories.read(tmp_path / "t.parquet", only_accepted=False)[1][:, -1], rtol=1e-6)


def score_planted(tmp_path, spec: dict, epochs: int):
    """The planted manifest (m.parquet) and loss file (t.parquet) scored by the detector `spec`
    into s.parquet; returns (manifest, poisoned mask)."""
    man = _manifest()
    poisoned = man["attack"].notna().to_numpy()
    _write_losses(tmp_path / "t.parquet", len(man), epochs, poisoned)
    _write_manifest(tmp_path / "m.parquet", man)
    stages.score(spec, {**files(tmp_path / "m.parquet"), "trajectories": tmp_path / "t.parquet"}, {"out": tmp_path / "s.parquet"})
    return man, poisoned


def test_plan_weights_and_remedies_are_blind_to_ground_truth(tmp_path):
    man, poisoned = score_planted(tmp_path, {"detector": "lfd", "type": "teacher_loss", "model": "m"}, 3)
    loss = trajectories.read(tmp_path / "t.parquet", only_accepted=False)[1][:, -1]
    plans = {}
    for name, spec in {"lfd": {"remedy": "reweight", "alpha": 0.15, "beta": 1e-3},
                       "rm": {"remedy": "remove", "r_reject": 0.1}, "none": {"remedy": "none"}}.items():
        inp = files(tmp_path / "m.parquet") | ({"scores": tmp_path / "s.parquet"} if name != "none" else {})
        meta = stages.plan({"defense": name, "detector": "lfd", **spec}, inp, {"out": tmp_path / f"{name}.parquet"})
        plans[name] = (pd.read_parquet(tmp_path / f"{name}.parquet"), meta)
    w = plans["lfd"][0]["weight"].to_numpy()
    # The plan's weights are Eq. 6 on the teacher's losses, exactly.
    np.testing.assert_allclose(w, lfd_weights(loss, 0.15, 1e-3), rtol=1e-6)
    assert plans["lfd"][1]["ascent_clamp"] == 10.0 and plans["lfd"][1]["n_ascent"] == (w < 0).sum() > 0
    assert (w[poisoned] < 0).all()  # the planted poison is what gets ascended
    assert set(np.unique(plans["rm"][0]["weight"])) == {0.0, 1.0} and plans["rm"][1]["n_removed"] == 20
    assert (plans["none"][0]["weight"] == 1).all() and plans["none"][0]["score"].isna().all()
    # Non-oracle remedies read only the defender's columns: shuffled ground truth, same plan.
    _write_manifest(tmp_path / "m.parquet", man.assign(attack=pd.array([None] * len(man), dtype="string")))
    stages.plan({"defense": "lfd", "detector": "lfd", "remedy": "reweight", "alpha": 0.15, "beta": 1e-3},
                {**files(tmp_path / "m.parquet"), "scores": tmp_path / "s.parquet"}, {"out": tmp_path / "again.parquet"})
    np.testing.assert_array_equal(pd.read_parquet(tmp_path / "again.parquet")["weight"], w)
    assert not REMEDIES.get("reweight").ground_truth and REMEDIES.get("oracle").ground_truth


def test_reweight_from_another_detector_uses_max_minus_score():
    man = _manifest()
    scores = np.linspace(-1, 3, len(man))
    w = REMEDIES.get("reweight")(alpha=0.2, beta=0.01).weights(scores, man, {"detector": "badloss"})
    np.testing.assert_allclose(w, lfd_weights(scores.max() - scores, 0.2, 0.01), rtol=1e-6)
    assert (w[scores >= np.sort(scores)[::-1][int(0.2 * len(man))]] <= 0).all()  # the most suspicious ascend


DIGITS = {"image_size": 16, "model": "smallcnn", "epochs": 3, "batch_size": 64, "lr": 0.003,
          "attacks": {"patch": {"ratio": 0.05}, "blend_random": {"ratio": 0.04, "alpha": 0.1}}}


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    """A poisoned digits cell with the config that drives it."""
    root = tmp_path_factory.mktemp("cell")
    cfg = config.validate({"device": "cpu", "bona_fide": {"n_clean": 60}, "datasets": {"digits": copy.deepcopy(DIGITS)},
                           "defender_models": {"pretrain": {"r_epoch": 0.5, "augment": "none", "record": "eval"},
                                               "teacher": {"model": "resnet_s", "epochs": 2, "optimizer": "adam",
                                                           "lr": 0.01, "weight_decay": 0}},
                           "detectors": {"badloss": {"type": "badloss", "k": 10}, "lfd": {"type": "teacher_loss"}},
                           "defenses": {"none": {"remedy": "none"}, "badloss": {"detector": "badloss", "remedy": "remove"},
                                        "lfd": {"detector": "lfd", "remedy": "reweight", "alpha": 0.15}}})
    def run(stage, **extra):
        return run_job(cfg, stage, str(root), dataset="digits", scenario="multi", seed=0, **extra)

    run("poison")
    run("bonafide")
    return cfg, root, run


def test_zero_one_plan_reproduces_removal_bit_for_bit(cell):
    """Removal through weights in {0, 1} trains exactly what training on the kept subset does."""
    from poisongrid.training import fit, load_model

    cfg, root, run = cell
    run("pretrain", model="pretrain")
    run("score", detector="badloss")
    run("plan", defense="badloss")
    _, inp, out = run("train", defense="badloss")
    spec = config.stage_spec(cfg, "train", "digits", "multi", 0, "badloss")
    ds, man, _, x = stages._poisoned_training_set(spec, inp["manifest"], inp["images"])
    keep = pd.read_parquet(inp["plan"])["weight"].to_numpy() == 1
    ref = fit(spec["training"], x.subset(keep), man["label"].to_numpy()[keep], ds.num_classes, seed=0, device=torch.device("cpu"))
    model, meta = load_model(out["out"], torch.device("cpu"))
    assert meta["n_trained_on"] == keep.sum() == round(0.6 * len(man))
    for a, b in zip(model.state_dict().values(), ref.model.state_dict().values()):
        assert torch.equal(a.cpu(), b)


def test_lfd_cell_end_to_end_and_the_attacked_model_is_shared(cell):
    cfg, root, run = cell
    meta, _, out = run("pretrain", model="teacher")
    assert meta["record"] == "final" and meta["epochs_recorded"] == 1 and meta["model"] == "resnet_s"
    run("score", detector="lfd")
    pmeta, _, _ = run("plan", defense="lfd")
    assert pmeta["n_ascent"] > 0
    tmeta, _, _ = run("train", defense="lfd")
    assert tmeta["n_ascent"] == pmeta["n_ascent"]
    m, inp, mout = run("evaluate", defense="lfd")
    assert m["detector_type"] == "teacher_loss" and m["n_ascent"] == pmeta["n_ascent"] and m["detection"]["auroc"] is not None
    assert m["wall_time_s"]["score"] is not None and m["wall_time_s"]["pretrain"] is not None
    # The `none` defense trains nothing of its own: it evaluates the attacked defender model.
    run("pretrain", model="attacked")
    run("plan", defense="none")
    n, inp, _ = run("evaluate", defense="none")
    assert inp["weights"] == paths.path("defender_model", str(root), dataset="digits", scenario="multi", seed=0, model="attacked")
    assert n["n_removed"] == 0 and n["detection"] is None


def test_features_stage_matches_direct_computation(cell):
    from poisongrid.training import load_model, penultimate_features

    cfg, root, run = cell
    run("pretrain", model="pretrain")
    _, inp, out = run("features", model="pretrain")
    from poisongrid.io import load_features

    f, meta = load_features(out["out"])
    assert meta["cell"] == {**CELL_MULTI, "model": "pretrain"}
    spec = config.stage_spec(cfg, "features", "digits", "multi", 0, model="pretrain")
    _, man, _, x = stages._poisoned_training_set(spec, inp["manifest"], inp["images"])
    model, _ = load_model(inp["weights"], torch.device("cpu"))
    np.testing.assert_array_equal(f, penultimate_features(model, x, torch.device("cpu")))
    assert f.shape == (len(man), 64)


@pytest.mark.parametrize("preset", ["config.yaml", "configs/badloss-paper.yaml", "configs/badloss-rreject.yaml"])
def test_paper_presets_badloss_records_in_eval_mode(preset):
    c = config.load(preset, deep=False)
    badloss = [det for det in c["detectors"].values() if det["type"] == "badloss"]
    assert badloss
    for det in badloss:
        m = c["defender_models"][det["model"]]
        assert m["record"] == "eval" and m.get("spike_rule", "paper") == "paper" and not det.get("log_losses")


def test_every_detector_declares_what_it_reads():
    for name in DETECTORS.names():
        cls = DETECTORS.get(name)
        assert set(cls.needs) <= {"trajectories", "features", "weights", "images"}
        assert bool(cls.default_model) == bool(set(cls.needs) - {"images"})
        spec = {"type": name, "model": "x"}
        assert paths.STAGES["score"].inputs(spec)["manifest"] == ("manifest", {})
    json.dumps(paths.outputs("pretrain"))


def test_cell_jobs_cover_each_defense_once(cell):
    cfg, _, _ = cell
    jobs = cell_jobs(cfg, "digits", "multi", 0, ["none", "badloss", "lfd"])
    names = [(s, c.get("model") or c.get("detector") or c.get("defense")) for s, c in jobs]
    assert names[:2] == [("poison", None), ("bonafide", None)]
    assert [n for s, n in names if s == "pretrain"] == ["attacked", "pretrain", "teacher"]
    assert ("train", "none") not in names and ("train", "lfd") in names
    assert names.index(("score", "lfd")) < names.index(("plan", "lfd")) < names.index(("train", "lfd"))


def test_cli_errors_are_one_line_and_the_traceback_is_on_request(tmp_path, capsys, monkeypatch):
    from poisongrid.cli import main

    monkeypatch.delenv("POISONGRID_DEBUG", raising=False)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    assert main(["show", str(bad)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "poisongrid show: error:" in err
    with pytest.raises(Exception):
        main(["--debug", "show", str(bad)])
    # A file that cannot be written names its path (here a folder that is a file; root writes anywhere else).
    (tmp_path / "afile").write_text("x")
    spec = json.dumps({"defense": "oracle", "remedy": "oracle"})
    _write_manifest(tmp_path / "m.parquet", _manifest())
    code = main(["plan", "--spec", spec, "--manifest", str(tmp_path / "m.parquet"), "--bona_fide",
                 str(files(tmp_path / "m.parquet")["bona_fide"]), "--out", str(tmp_path / "afile" / "p.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(tmp_path / "afile") in err and "Traceback" not in err


def test_mixed_up_artifacts_are_refused_with_the_file_named(cell, tmp_path):
    """A final model copied from another defense, a manifest from another seed, a trigger made
    for another seed: each stops the stage with a message naming the file, never a wrong number."""
    import shutil

    from poisongrid.errors import ArtifactError

    cfg, root, run = cell
    for stage, kw in [("pretrain", {"model": "attacked"}), ("pretrain", {"model": "teacher"}), ("score", {"detector": "lfd"}),
                      ("plan", {"defense": "lfd"}), ("train", {"defense": "lfd"}), ("plan", {"defense": "none"})]:
        if not all(os.path.exists(p) for p in paths.outputs(stage, str(root), dataset="digits",
                                                                                 scenario="multi", seed=0, **kw).values()):
            run(stage, **kw)
    r = tmp_path / "r"
    shutil.copytree(root, r)
    w = dict(dataset="digits", scenario="multi", seed=0)
    lfd_model = paths.path("final_model", str(r), defense="lfd", **w)
    shutil.copy(paths.path("defender_model", str(r), model="attacked", **w), lfd_model)
    with pytest.raises(ArtifactError, match=r"model.pt: was made for .*model attacked.*this job is for .*defense lfd"):
        run_job(cfg, "evaluate", str(r), defense="lfd", **w)
    run_job(cfg, "poison", str(tmp_path / "s1"), dataset="digits", scenario="multi", seed=1)
    shutil.copy(paths.path("manifest", str(tmp_path / "s1"), dataset="digits", scenario="multi", seed=1),
                paths.path("manifest", str(r), **w))
    with pytest.raises(ArtifactError, match=r"manifest.parquet: was made for .*seed 1.*this job is for .*seed 0"):
        run_job(cfg, "evaluate", str(r), defense="none", **w)


def test_a_trigger_made_for_another_seed_is_refused_before_poisoning(tmp_path):
    from poisongrid.errors import ArtifactError
    from poisongrid.io import save_npz

    c = config.validate({"device": "cpu", "bona_fide": {"n_clean": 60},
                         "datasets": {"digits": {**copy.deepcopy(DIGITS), "attacks": {"narcissus": {"ratio": 0.02}}}}})
    trig = paths.path("trigger", str(tmp_path), dataset="digits", attack="narcissus", seed=0)
    save_npz(trig, trigger=np.zeros((3, 16, 16), np.float32), target=np.int64(0), dataset=np.array("digits"),
             seed=np.int64(1), attack=np.array("narcissus"))
    with pytest.raises(ArtifactError, match=r"narcissus-seed0.npz: a trigger made for .*'seed': 1"):
        run_job(c, "poison", str(tmp_path), dataset="digits", scenario="single-narcissus", seed=0)
    assert not os.path.exists(paths.path("manifest", str(tmp_path), dataset="digits", scenario="single-narcissus", seed=0))


def test_clean_scenario_runs_without_any_attack(tmp_path):
    """The clean scenario poisons nothing; a defense's cost on clean data is its clean accuracy."""
    cfg = config.validate({"device": "cpu", "bona_fide": {"n_clean": 60},
                           "datasets": {"digits": {**copy.deepcopy(DIGITS), "scenarios": ["clean", "multi"]}},
                           "detectors": {"badloss": {"type": "badloss", "k": 10}},
                           "defender_models": {"pretrain": {"r_epoch": 0.5, "augment": "none", "record": "eval"}},
                           "defenses": {"none": {"remedy": "none"}, "badloss": {"detector": "badloss", "remedy": "remove"}}})
    root = str(tmp_path)
    done = {}
    for stage, c in cell_jobs(cfg, "digits", "clean", 0, ["none", "badloss"]):
        done[(stage, c.get("defense"))] = run_job(cfg, stage, root, **c)[0]
    w = dict(dataset="digits", scenario="clean", seed=0)
    man = poisoning.read_manifest(paths.path("manifest", root, **w), paths.path("bona_fide", root, bona="default", **w))[0]
    assert man["attack"].isna().all() and (man["label"] == man["orig_label"]).all() and man["bona_fide"].sum() == 60
    for d in ("none", "badloss"):
        m = done[("evaluate", d)]
        assert m["attacks"] == [] and m["asr"] == {} and m["mean_asr"] is None and 0.5 < m["clean_accuracy"] <= 1
    assert done[("evaluate", "badloss")]["n_removed"] == round(0.4 * len(man))


def test_score_wall_time_covers_the_detectors_whole_run(tmp_path):
    """A detector that optimises before opening its writer (Neural Cleanse, frequency analysis):
    the scores record the whole run, which the cost table reads."""
    import time as _time

    from poisongrid.detectors import Detector, ScoreWriter

    name = "slow_test_detector"
    if name not in DETECTORS:
        @DETECTORS.register(name)
        class Slow(Detector):
            type = name
            needs = ()
            default_model = None

            def score(self, out_path):
                _time.sleep(1.5)
                meta = {"cell": self.cell, "detector": self.type, "params": self.p}
                with ScoreWriter(out_path, meta, self.view) as w:
                    w.write(self.view.index, np.zeros(len(self.view)))
                return meta

    try:
        man = tmp_path / "manifest.parquet"
        _write_manifest(man, _manifest())
        out = tmp_path / "scores.parquet"
        meta = stages.score({"detector": "slow", "type": name}, files(man), {"out": str(out)})
        assert meta["wall_time_s"] >= 1.5 and read_scores(out)[1]["wall_time_s"] >= 1.5
    finally:
        DETECTORS._items.pop(name, None)  # other tests enumerate the real detectors


def test_lfd_weights_stay_within_what_the_remedy_declares_even_when_gamma_is_large():
    """Eq. 6's negative weights reach below -beta when gamma exceeds half the largest loss (a
    teacher that fits most examples); the plan check must accept them (a grid once stopped here)."""
    from poisongrid.remedies import REMEDIES
    from poisongrid.remedies.standard import lfd_weights

    loss = np.array([0.0, 0.5, 0.9, 0.95, 1.0] * 20)  # alpha 0.6: gamma 0.95 > max / 2
    w = lfd_weights(loss, 0.6, 1e-3)
    assert w.min() < -1e-3
    lo, hi = REMEDIES.get("reweight")(alpha=0.6, beta=1e-3).weight_range()
    assert lo <= w.min() and w.max() <= hi == 1.0
