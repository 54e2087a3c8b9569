"""The adaptive blend attack: the blend formula, label flips, its learned strength and settings."""
import numpy as np
import pytest

from poisongrid import poisoning
from poisongrid.attacks import BLEND_TYPE, build_attack
from poisongrid.attacks.adaptive import AdaptiveBlend, choose
from poisongrid.attacks.base import LearnJob
from poisongrid.data import Dataset, Split
from poisongrid.errors import ConfigError

KEY = "datasets.d.attacks.adaptive_blend.learn"
SHAPE = (3, 16, 16)
TRAINING = {"batch_size": 16, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0, "augment": "none"}


def _dataset(per_class=30, classes=3, test_per_class=20, size=16, seed=0):
    """Each class brightens its own channel: a task a tiny CNN learns in a few epochs."""
    rng = np.random.default_rng(seed)

    def split(per):
        x = rng.integers(0, 120, size=(per * classes, 3, size, size), dtype=np.uint8)
        y = np.repeat(np.arange(classes), per).astype(np.int64)
        for c in range(classes):
            x[y == c, c] += 100
        return Split(x, y)

    return Dataset("tiny", split(per_class), split(test_per_class), [str(c) for c in range(classes)])


def _artifact(alpha=0.3, seed=0):
    return {"alpha": np.float64(alpha), "pattern": np.random.default_rng(seed).integers(0, 256, SHAPE, dtype=np.uint8)}


# ---- the trigger ---------------------------------------------------------------------------------

def test_trigger_is_the_blend_formula_on_hand_values():
    art = _artifact(0.25)
    art["pattern"][:] = 200
    atk = build_attack("adaptive_blend", SHAPE, 0, {}, art)
    x = np.zeros((2, *SHAPE), np.uint8)
    x[0] = 100
    x[1] = 255
    y = atk.apply(x)
    # 0.25 * 200 + 0.75 * 100 = 125; 0.25 * 200 + 0.75 * 255 = 241.25 -> 241
    assert (y[0] == 125).all() and (y[1] == 241).all()
    # boosted: alpha 0.5: 150 and 227.5 -> 228 (rounded, not truncated)
    yb = atk.apply(x, boost=True)
    assert (yb[0] == 150).all() and (yb[1] == 228).all()
    assert "adaptive_blend" in BLEND_TYPE


def test_trigger_matches_formula_on_random_images_and_caps_boost():
    art = _artifact(0.7, seed=3)
    atk = build_attack("adaptive_blend", SHAPE, 0, {}, art)
    x = np.random.default_rng(1).integers(0, 256, (4, *SHAPE), dtype=np.uint8)
    want = np.clip(np.rint(0.7 * art["pattern"].astype(np.float64) + 0.3 * x), 0, 255)
    assert np.abs(atk.apply(x).astype(int) - want.astype(int)).max() <= 1  # float32 vs float64 at .5 ties
    np.testing.assert_array_equal(atk.apply(x, boost=True), np.broadcast_to(art["pattern"], x.shape))  # min(1.4, 1)


def test_poisoned_labels_are_the_target_and_only_chosen_rows_change():
    ds = _dataset()
    art = _artifact(0.2)
    ps = poisoning.poison(ds, {"adaptive_blend": {"ratio": 0.1, "target": 2}}, ["adaptive_blend"], seed=0,
                          artifacts={"adaptive_blend": art})
    m = ps.manifest
    rows = m[m["attack"] == "adaptive_blend"]
    assert len(rows) == 9 and (rows["label"] == 2).all()
    assert (m.loc[m["attack"].isna(), "label"] == m.loc[m["attack"].isna(), "orig_label"]).all()
    atk = build_attack("adaptive_blend", SHAPE, 0, {}, art)
    np.testing.assert_array_equal(ps.images, atk.apply(ds.train.images[ps.index]))


def test_without_artifact_it_validates_but_cannot_apply():
    atk = build_attack("adaptive_blend", SHAPE, 0)
    with pytest.raises(ConfigError, match="trigger stage"):
        atk.apply(np.zeros((1, *SHAPE), np.uint8))


@pytest.mark.parametrize("art", [{"alpha": np.float64(0.0), "pattern": np.zeros(SHAPE, np.uint8)},
                                 {"alpha": np.float64(1.5), "pattern": np.zeros(SHAPE, np.uint8)},
                                 {"alpha": np.float64(0.1), "pattern": np.zeros((3, 8, 8), np.uint8)},
                                 {"alpha": np.float64(0.1), "pattern": np.zeros(SHAPE, np.float32)},
                                 {"alpha": np.float64(0.1)}])
def test_bad_artifact(art):
    with pytest.raises(ConfigError):
        build_attack("adaptive_blend", SHAPE, 0, {}, art)


# ---- choosing the strength -----------------------------------------------------------------------

def test_choose_takes_the_most_clean_like_strength_that_reaches_min_asr():
    rows = [{"asr": 0.2, "knn_auroc": 0.5, "mean_gap": 0.1},  # most clean-like, but too weak
            {"asr": 0.95, "knn_auroc": 0.7, "mean_gap": 0.3},
            {"asr": 1.0, "knn_auroc": 0.9, "mean_gap": 0.2}]
    assert choose(rows, "knn_auroc", 0.9) == (1, True)
    assert choose(rows, "mean_gap", 0.9) == (2, True)
    assert choose(rows, "knn_auroc", 0.0) == (0, True)
    assert choose(rows, "knn_auroc", 1.0) == (2, True)
    # nobody reaches it: the highest ASR, flagged
    assert choose(rows[:2], "knn_auroc", 0.99) == (1, False)


def _job(settings, seed=0, target=1):
    import torch

    s = AdaptiveBlend.check_learn({"model": "smallcnn", "epochs": 4, "alphas": [0.02, 0.2, 0.6], "min_asr": 0.5,
                                   "poison_ratio": 0.1, "n_reference": 20, "k": 5, "record": "train", **settings}, KEY)
    job = LearnJob(dataset=_dataset(), target=target, seed=seed, params={}, settings=s, training=dict(TRAINING),
                   device=torch.device("cpu"))
    models = []
    fit = job.fit

    def spy(images, labels, model, epochs, **kw):
        res = fit(images, labels, model, epochs, **kw)
        models.append((images, labels, res.model))
        return res

    job.fit = spy
    return job, models


def test_learn_picks_a_grid_strength_that_meets_the_asr_constraint(one_thread):
    from poisongrid.training import predict

    job, models = _job({})
    art = AdaptiveBlend.learn(job)
    alphas = [0.02, 0.2, 0.6]
    np.testing.assert_array_equal(art["alphas"], alphas)
    assert float(art["alpha"]) in alphas and len(models) == 3
    # the recorded ASR of every strength is the surrogate's, recomputed here from its own model
    test = job.dataset.test
    victims = test.images[test.labels != 1]
    for a, (x, y, model), asr in zip(alphas, models, art["asr"]):
        atk = build_attack("adaptive_blend", SHAPE, 0, {}, {"alpha": np.float64(a), "pattern": art["pattern"]})
        assert (predict(model, atk.apply(victims), job.device) == 1).mean() == pytest.approx(asr)
        changed = (x != job.dataset.train.images).any(axis=(1, 2, 3))
        assert changed.sum() == 9 and (y[changed] == 1).all() and (job.dataset.train.labels[changed] != 1).all()
    # the planted task: the strongest blend installs, so the constraint can be met
    assert art["asr"].max() >= 0.5
    i = alphas.index(float(art["alpha"]))
    assert bool(art["met_min_asr"]) and art["asr"][i] >= 0.5
    ok = [j for j in range(3) if art["asr"][j] >= 0.5]
    assert art["knn_auroc"][i] == min(art["knn_auroc"][j] for j in ok)
    assert art["poison_traj"].shape == art["clean_traj"].shape == (3, 4)
    # and the artifact builds the attack that poisons with that strength
    atk = build_attack("adaptive_blend", SHAPE, 0, {}, art)
    assert atk.alpha == float(art["alpha"])


def test_learn_without_a_reachable_asr_takes_the_strongest_and_says_so(one_thread):
    job, _ = _job({"alphas": [0.01, 0.02], "min_asr": 1.0, "epochs": 1})
    art = AdaptiveBlend.learn(job)
    i = int(np.argmax(art["asr"]))
    assert not bool(art["met_min_asr"]) and float(art["alpha"]) == art["alphas"][i]


def test_learn_uses_the_attack_ratio_when_poison_ratio_is_unset(one_thread):
    job, models = _job({"poison_ratio": None, "alphas": [0.5], "epochs": 1})
    job.ratio = 0.2
    art = AdaptiveBlend.learn(job)
    assert int(art["surrogate_poisoned"]) == 18
    job.ratio = None
    with pytest.raises(ConfigError, match="poison_ratio"):
        AdaptiveBlend.learn(job)


# ---- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    ({"alphas": []}, "alphas"), ({"alphas": [0.1, 0.1]}, "alphas"), ({"alphas": [0, 0.1]}, "alphas"),
    ({"alphas": [1.5]}, "alphas"), ({"alphas": 0.1}, "alphas"), ({"alphas": ["0.1"]}, "alphas"),
    ({"min_asr": 1.2}, "min_asr"), ({"min_asr": -0.1}, "min_asr"), ({"min_asr": True}, "min_asr"),
    ({"poison_ratio": 0}, "poison_ratio"), ({"poison_ratio": 1.0}, "poison_ratio"),
    ({"k": 0}, "k"), ({"k": 2.5}, "k"), ({"n_reference": -1}, "n_reference"), ({"epochs": 0}, "epochs"),
    ({"record": "final"}, "record"), ({"criterion": "auroc"}, "criterion"), ({"augment": "jitter"}, "augment"),
    ({"model": "nope"}, "model"), ({"pool_fraction": 1.5}, "pool_fraction"), ({"log_losses": 1}, "log_losses"),
    ({"steps": 3}, "steps"), ("fast", "learn")])
def test_bad_learn_settings(bad, match):
    with pytest.raises(ConfigError) as e:
        AdaptiveBlend.check_learn(bad, KEY)
    assert match in e.value.key


def test_unknown_param_and_defaults():
    with pytest.raises(ConfigError):
        build_attack("adaptive_blend", SHAPE, 0, {"alpha": 0.1})  # the strength is learned, not set
    s = AdaptiveBlend.check_learn({}, KEY)
    assert s["alphas"] == [0.02, 0.05, 0.1, 0.2] and s["min_asr"] == 0.9 and s["poison_ratio"] is None


def test_learn_epochs_counts_one_surrogate_per_strength():
    assert AdaptiveBlend.learn_epochs({"alphas": [0.1, 0.2, 0.3], "epochs": 10, "pool_fraction": 0.5, "record": "train"}) == 15
    assert AdaptiveBlend.learn_epochs({"alphas": [0.1, 0.2, 0.3], "epochs": 10, "pool_fraction": 0.5, "record": "eval"}) == 20
