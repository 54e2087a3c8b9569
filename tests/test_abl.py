"""ABL: the isolation objectives (flooding, LGA), the `abl` detector and the `unlearn` remedy."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch

import planted
from planted import files, write_manifest
from poisongrid import config, stages, trajectories
from poisongrid.errors import ConfigError
from poisongrid.defender import DefenderImages
from poisongrid.remedies import REMEDIES, FinalTraining
from poisongrid.training import batch_objective, fit, per_example_loss

CPU = torch.device("cpu")
TRAIN = {"model": "smallcnn", "epochs": 3, "batch_size": 32, "optimizer": "adamw", "lr": 0.003, "weight_decay": 1e-4,
         "augment": "none"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- objectives ---------------------------------------------------------------------------------


@pytest.mark.parametrize("per, want", [
    # mean 0.75 (above the level 0.5)
    ([0.1, 0.3, 0.9, 1.7], {"ce": 0.75, "flooding": 0.75, "flooding_example": (0.9 + 0.7 + 0.9 + 1.7) / 4,
                            "lga": 0.75, "lga_example": (-0.1 - 0.3 + 0.9 + 1.7) / 4}),
    # mean 0.3 (below it): the batch-mean forms turn to ascent
    ([0.1, 0.2, 0.3, 0.6], {"ce": 0.3, "flooding": 0.2 + 0.5, "flooding_example": (0.9 + 0.8 + 0.7 + 0.6) / 4,
                            "lga": -0.3, "lga_example": (-0.1 - 0.2 - 0.3 + 0.6) / 4}),
])
def test_objectives_match_hand_computation(per, want):
    for name, value in want.items():
        t = torch.tensor(per, dtype=torch.float64, requires_grad=True)
        loss = batch_objective(name, 0.5)(t)
        assert loss.item() == pytest.approx(value, abs=1e-12), name
        loss.backward()
        n, m = len(per), float(np.mean(per))
        sign = np.sign(np.array(per) - 0.5)
        grad = {"ce": np.full(n, 1 / n), "flooding": np.full(n, np.sign(m - 0.5) / n), "flooding_example": sign / n,
                "lga": np.full(n, np.sign(m - 0.5) / n), "lga_example": sign / n}[name]
        np.testing.assert_allclose(t.grad.numpy(), grad, atol=1e-12, err_msg=name)
    with pytest.raises(ConfigError):
        batch_objective("flood", 0.5)


# ---- a tiny planted problem ---------------------------------------------------------------------


def _problem(n=240, classes=10, poisoned_frac=0.1, seed=0):
    """16x16 images: faint class templates under heavy noise (a clean task learned slowly) and a
    4x4 white corner patch that relabels to class 0 (trivially separable, learned first).
    Returns the training images, the labels trained on and the truth (poisoned mask)."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, (classes, 3, 16, 16))
    labels = rng.integers(0, classes, n)
    clean = np.clip(0.2 * templates[labels] + 0.8 * rng.normal(128, 60, (n, 3, 16, 16)), 0, 255).astype(np.uint8)
    poisoned = np.sort(rng.choice(n, int(n * poisoned_frac), replace=False))
    patched = clean[poisoned].copy()
    patched[:, :, -4:, -4:] = 255
    labels = labels.copy()
    labels[poisoned] = 0
    is_p = np.zeros(n, bool)
    is_p[poisoned] = True
    return DefenderImages.overlay(clean, poisoned, patched), labels.astype(np.int64), is_p


def _auroc(pos, neg) -> float:
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def _write_manifest(path, labels, bona):
    man = pd.DataFrame({"index": np.arange(len(labels), dtype=np.int64), "label": labels, "bona_fide": bona,
                        "attack": pd.array([None] * len(labels), dtype="string")})
    write_manifest(path, man, {"scenario": "single-patch", "attacks": {}, "seed": 0,
                               "cell": {"dataset": "d", "scenario": "single-patch", "seed": 0}})


def test_abl_detector_ranks_planted_patch_above_clean(tmp_path):
    x, y, is_p = _problem()
    # BaDLoss's adaptation: per-example flooding at 0.5, the loss after the last epoch.
    iso = fit({**TRAIN, "epochs": 5, "objective": "flooding_example", "objective_level": 0.5}, x, y, 10, seed=0,
              device=CPU, record="final")
    trajectories.write(tmp_path / "t.parquet", iso.losses, {
        "epochs_recorded": 1, "accepted_epochs": [0], "skipped_epochs": [], "n_examples": len(y), "model_name": "isolation",
        "cell": {"dataset": "d", "scenario": "single-patch", "seed": 0, "model": "isolation"}, "model": "smallcnn",
        "wall_time_s": 1.0})
    _write_manifest(tmp_path / "m.parquet", y, np.zeros(len(y), bool))
    meta = stages.score({"detector": "abl", "type": "abl", "model": "isolation"},
                        {**files(tmp_path / "m.parquet"), "trajectories": tmp_path / "t.parquet"},
                        {"out": tmp_path / "s.parquet"})
    s = pd.read_parquet(tmp_path / "s.parquet").sort_values("index")["score"].to_numpy()
    np.testing.assert_allclose(s, -iso.losses[0].astype(np.float64))
    assert meta["detector"] == "abl" and meta["negated_loss"]
    assert _auroc(s[is_p], s[~is_p]) > 0.8


# ---- the unlearn remedy -------------------------------------------------------------------------


def _cfg(**iso):
    return {"detectors": {"abl": {"type": "abl", "model": "isolation"}},
            "defender_models": {"attacked": {}, "isolation": {"epochs": 10, "objective": "lga", **iso}},
            "datasets": {"d": {"model": "smallcnn"}}, "bona_fide": {"n_clean": 0}}


def test_unlearn_isolates_the_highest_scores_never_bona_fide():
    rng = np.random.default_rng(1)
    n = 300
    scores = rng.normal(size=n)
    bona = np.zeros(n, bool)
    bona[np.argsort(-scores)[:5]] = True  # the 5 most suspicious are bona fide: never isolated
    man = pd.DataFrame({"index": np.arange(n), "label": np.zeros(n, int), "bona_fide": bona})
    p = REMEDIES.get("unlearn").check({"remedy": "unlearn", "detector": "abl", "r_isolate": 0.05}, "defenses.u", _cfg(), planted.bona(_cfg()))
    assert p["model"] == "isolation" and p["finetune_epochs"] == 60 and p["unlearn_lr"] == 5e-4
    assert p["unlearn_optimizer"] == "sgd" and p["finetune_lr"] is None
    w = REMEDIES.get("unlearn")(**p).weights(scores, man, {})
    assert w.dtype == np.float32 and set(np.unique(w)) == {-1.0, 1.0}
    iso = w < 0
    assert iso.sum() == round(0.05 * n) == 15 and not (iso & bona).any()
    want = np.argsort(-np.where(bona, -np.inf, scores))[:15]
    assert set(np.flatnonzero(iso)) == set(want)


@pytest.mark.parametrize("key, value", [
    ("r_isolate", 0), ("r_isolate", 1), ("r_isolate", 1.5), ("r_isolate", -0.01), ("r_isolate", "0.01"),
    ("model", "nope"), ("finetune_epochs", 0), ("finetune_epochs", 2.5), ("finetune_epochs", True),
    ("unlearn_epochs", -1), ("unlearn_epochs", "5"), ("unlearn_lr", 0), ("finetune_lr", -0.1), ("ascent_clamp", 0),
    ("unlearn_optimizer", "lbfgs"), ("unlearn_optimizer", 3), ("bogus", 1),
])
def test_unlearn_bad_params(key, value):
    with pytest.raises(ConfigError, match=key if key != "bogus" else "bogus"):
        REMEDIES.get("unlearn").check({"remedy": "unlearn", "detector": "abl", key: value}, "defenses.u", _cfg(), planted.bona(_cfg()))


def test_unlearn_refuses_an_isolation_model_of_another_architecture():
    with pytest.raises(ConfigError, match="isolation.model"):
        REMEDIES.get("unlearn").check({"remedy": "unlearn", "detector": "abl"}, "defenses.u", _cfg(model="resnet_s"), planted.bona(_cfg()))


def test_abl_detector_bad_model():
    from poisongrid.detectors import DETECTORS

    with pytest.raises(ConfigError, match="model"):
        DETECTORS.get("abl").check({"type": "abl", "model": "nope"}, "detectors.abl", _cfg(), planted.bona(_cfg()))
    DETECTORS.get("abl").check({"type": "abl"}, "detectors.abl", _cfg(), planted.bona(_cfg()))  # default: isolation


def test_unlearn_trains_both_phases_and_raises_the_isolated_loss():
    x, y, is_p = _problem(n=160)
    iso_model = fit({**TRAIN, "epochs": 2, "objective": "lga"}, x, y, 10, seed=0, device=CPU).model
    loss = per_example_loss(iso_model, x.materialize(), torch.from_numpy(y), CPU).numpy()
    remedy = REMEDIES.get("unlearn")(r_isolate=0.05, finetune_epochs=1, unlearn_epochs=2, unlearn_lr=1e-3)
    man = pd.DataFrame({"index": np.arange(len(y)), "label": y, "bona_fide": np.zeros(len(y), bool)})
    w = remedy.weights(-loss, man, {})
    iso = w < 0
    assert iso.sum() == 8 and loss[iso].max() <= loss[~iso].min()  # the lowest losses
    assert is_p[iso].mean() >= 0.75  # mostly the planted poison
    job = FinalTraining(view=planted.view(x, y, man["bona_fide"].to_numpy(), iso_model, num_classes=10, training=TRAIN),
                        weights=w, plan_meta=remedy.plan_meta())
    res = remedy.train(job)
    assert [p for p, _ in job.phases] == ["finetune", "unlearn"]
    (_, ft), (_, ul) = job.phases
    assert ft.epochs_run == 1 and ul.epochs_run == 2 and res is ul
    # The fine-tuning starts from the isolation model (not a fresh one) and leaves it untouched.
    after_iso = per_example_loss(iso_model, x.materialize(), torch.from_numpy(y), CPU).numpy()
    np.testing.assert_array_equal(after_iso, loss)
    xi = x.subset(iso).materialize()
    yi = torch.from_numpy(y[iso])
    before = per_example_loss(ft.model, xi, yi, CPU).numpy()
    after = per_example_loss(ul.model, xi, yi, CPU).numpy()
    assert after.mean() > before.mean() + 0.1
    # Gradient ascent: the mean training loss of the unlearn phase is -CE (negative).
    assert all(t < 0 for t in ul.train_loss)


DIGITS = {"image_size": 16, "model": "smallcnn", "epochs": 3, "batch_size": 64, "lr": 0.003,
          "attacks": {"patch": {"ratio": 0.05}}}
SNIPPET = {
    "defender_models": {
        "isolation": {"epochs": 10, "objective": "flooding_example", "objective_level": 0.5, "record": "final"},
        "isolation_lga": {"epochs": 10, "objective": "lga", "objective_level": 0.5, "record": "final", "augment": "none"}},
    "detectors": {"abl": {"type": "abl"}, "abl_lga": {"type": "abl", "model": "isolation_lga"}},
    "defenses": {"abl": {"detector": "abl", "remedy": "remove", "r_reject": 0.15},
                 "abl_unlearn": {"detector": "abl_lga", "remedy": "unlearn", "model": "isolation_lga", "r_isolate": 0.01,
                                 "finetune_epochs": 20, "unlearn_epochs": 5, "unlearn_lr": 5e-4}}}


def test_abl_config_snippet_validates():
    cfg = config.validate({"device": "cpu", "bona_fide": {"n_clean": 60}, "datasets": {"digits": copy.deepcopy(DIGITS)},
                           **copy.deepcopy(SNIPPET)})
    assert cfg["detectors"]["abl"]["model"] == "isolation"
    assert cfg["defenses"]["abl_unlearn"]["finetune_lr"] is None
    spec = config.stage_spec(cfg, "pretrain", "digits", "multi", 0, model="isolation")
    assert spec["model"]["training"]["objective"] == "flooding_example" and spec["model"]["run"] == 10
    bad = copy.deepcopy(SNIPPET)
    bad["defender_models"]["isolation"]["objective"] = "flood"
    with pytest.raises(ConfigError):
        config.validate({"device": "cpu", "bona_fide": {"n_clean": 60}, "datasets": {"digits": copy.deepcopy(DIGITS)}, **bad})


@pytest.mark.slow
def test_abl_defenses_end_to_end_on_digits(tmp_path):
    """Both variants through the stages: isolation pretrain -> abl scores -> plan -> train -> evaluate."""
    from poisongrid.jobs import run_job
    from poisongrid.training import load_model

    snip = copy.deepcopy(SNIPPET)
    for m in snip["defender_models"].values():
        m["epochs"] = 2
    snip["defenses"]["abl_unlearn"].update(finetune_epochs=1, unlearn_epochs=2)
    cfg = config.validate({"device": "cpu", "bona_fide": {"n_clean": 60},
                           "datasets": {"digits": {**copy.deepcopy(DIGITS), "epochs": 2}}, **snip})

    def run(stage, **extra):
        return run_job(cfg, stage, str(tmp_path), dataset="digits", scenario="multi", seed=0, **extra)

    run("poison")
    run("bonafide")
    for model in ("isolation", "isolation_lga"):
        run("pretrain", model=model)
    for det in ("abl", "abl_lga"):
        run("score", detector=det)
    pm, _, _ = run("plan", defense="abl")
    assert pm["n_removed"] == round(0.15 * pm["n_train"])
    um, _, _ = run("plan", defense="abl_unlearn")
    assert um["n_ascent"] == round(0.01 * um["n_train"]) and um["n_removed"] == 0
    tm, inp, out = run("train", defense="abl_unlearn")
    assert [p["phase"] for p in tm["phases"]] == ["finetune", "unlearn"] and tm["epochs"] == 3
    assert inp["weights"].endswith(".pt") and "isolation_lga" in str(inp["weights"])
    load_model(out["out"], CPU)
    run("train", defense="abl")
    for d in ("abl", "abl_unlearn"):
        em, _, _ = run("evaluate", defense=d)
        assert em["detection"]["auroc"] is not None
