"""Spectral Signatures and Activation Clustering on fixed features, against a direct numpy /
scikit-learn computation and on a planted poisoned subcluster; the remove_flagged remedy."""
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import FastICA
from sklearn.metrics import roc_auc_score, silhouette_score

import planted
from planted import files, write_manifest
from poisongrid import config, stages
from poisongrid.detectors import DETECTORS, read_scores
from poisongrid.errors import ConfigError
from poisongrid.io import save_features
from poisongrid.models import build_model
from poisongrid.remedies import REMEDIES
from poisongrid.training import save_model

CELL = {"dataset": "digits", "scenario": "single-patch", "seed": 0}
N_CLASSES, PER_CLASS, D, TARGET, N_POISON = 4, 60, 64, 2, 12


def _planted(seed=0):
    """Four Gaussian classes in a 64-d nonnegative feature space (one dead column). Class 2 is
    low-rank: its clean examples vary in 5 directions, its 12 poisoned examples in 5 others and
    are offset along one of them (a trigger feature the clean ones lack)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    f = rng.normal(0, 1, (N_CLASSES, D))[labels] * 3 + 10 + rng.normal(0, 1, (len(labels), D))
    poisoned = np.zeros(len(labels), bool)
    poisoned[np.flatnonzero(labels == TARGET)[:N_POISON]] = True
    basis = np.linalg.qr(rng.normal(size=(D, 10)))[0].T
    t = labels == TARGET
    f[t] = 10 + rng.normal(0, 0.05, (t.sum(), D))
    f[t & ~poisoned] += rng.normal(0, 1, ((t & ~poisoned).sum(), 5)) @ basis[:5]
    f[poisoned] += 4 * basis[5] + rng.normal(0, 1, (N_POISON, 5)) @ basis[5:]
    f[:, -1] = 0.0
    return np.maximum(f, 0).astype(np.float32), labels, poisoned


def _manifest(labels, poisoned, shuffled=False, seed=0):
    n = len(labels)
    attack = pd.array(np.where(poisoned, "patch", None), dtype="string")
    target = np.where(poisoned, TARGET, -1).astype(np.int64)
    bona = np.zeros(n, bool)
    bona[np.flatnonzero(~poisoned)[::10]] = True
    man = pd.DataFrame({"index": np.arange(n, dtype=np.int64), "label": labels.astype(np.int64),
                        "orig_label": labels.astype(np.int64), "attack": attack, "target": target, "bona_fide": bona})
    return planted.shuffle_ground_truth(man, seed=seed, columns=("attack", "target")) if shuffled else man


def _inputs(tmp_path, feats, labels, poisoned, shuffled=False, linear=None):
    """Manifest, features and a smallcnn model file (its last layer `linear` = (W, b) if given)
    of one cell, as the score stage reads them."""
    tag = "s" if shuffled else "m"
    write_manifest(tmp_path / f"{tag}.parquet", _manifest(labels, poisoned, shuffled),
                   {"scenario": "single-patch", "attacks": {}, "seed": 0, "cell": CELL})
    cell = {**CELL, "model": "attacked"}
    save_features(tmp_path / "f.npz", feats, {"cell": cell, "shape": list(feats.shape)})
    model = build_model("smallcnn", N_CLASSES, 16)
    if linear is not None:
        with torch.no_grad():
            model[-1].weight.copy_(torch.as_tensor(linear[0]))
            model[-1].bias.copy_(torch.as_tensor(linear[1]))
    save_model(tmp_path / "w.pt", model, {"model": "smallcnn", "num_classes": N_CLASSES, "image_size": 16, "cell": cell})
    return {**files(tmp_path / f"{tag}.parquet"), "features": tmp_path / "f.npz", "weights": tmp_path / "w.pt"}


def _score(tmp_path, inp, dtype, name="out", **params):
    spec = {"detector": "d", "type": dtype, "model": "attacked", "seed": 0, "runtime": {"device": "cpu", "threads": 1},
            **params}
    meta = stages.score(spec, inp, {"out": tmp_path / f"{name}.parquet"})
    df, _ = read_scores(tmp_path / f"{name}.parquet")
    return df.sort_values("index")["score"].to_numpy(), meta


def test_spectral_signatures_matches_direct_svd(tmp_path):
    feats, labels, poisoned = _planted()
    labels = labels.copy()
    labels[-1] = 7  # a class of one example scores 0
    inp = _inputs(tmp_path, feats, labels, poisoned)
    raw, _ = _score(tmp_path, inp, "spectral_signatures", "raw", per_class_rank=False)
    ranked, meta = _score(tmp_path, inp, "spectral_signatures", "rank")
    for c in np.unique(labels):
        idx = labels == c
        if idx.sum() < 2:
            assert raw[idx][0] == 0 and ranked[idx][0] == 0
            continue
        a = feats[idx].astype(np.float64)
        m = a - a.mean(0)
        # top eigenvector of the scatter matrix = top right singular vector of the centred matrix
        v = np.linalg.eigh(m.T @ m)[1][:, -1]
        tau = (m @ v) ** 2
        np.testing.assert_allclose(raw[idx], tau, rtol=1e-6, atol=1e-9)
        want = (np.argsort(np.argsort(tau)) + 1) / idx.sum()
        np.testing.assert_allclose(ranked[idx], want)
    assert set(meta["classes"]) == {0, 1, 2, 3, 7}


def _direct_ac(a, seed, k=10, thr=0.15):
    a = a[:, a.sum(0) != 0].astype(np.float64)
    z = FastICA(n_components=k, whiten="unit-variance", random_state=seed).fit_transform(a)
    lab = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(z)
    sil = silhouette_score(z, lab)
    small = lab == (0 if lab.sum() * 2 > len(a) else 1)
    return sil, small


def test_activation_clustering_matches_direct_sklearn_and_finds_planted_class(tmp_path):
    feats, labels, poisoned = _planted()
    inp = _inputs(tmp_path, feats, labels, poisoned)
    s, meta = _score(tmp_path, inp, "activation_clustering", group_by="label")
    for c in range(N_CLASSES):
        idx = np.flatnonzero(labels == c)
        seed = int(np.random.SeedSequence([0, c]).generate_state(1)[0] % (2**31))
        sil, small = _direct_ac(feats[idx], seed)
        assert meta["classes"][c]["silhouette"] == pytest.approx(sil, abs=1e-9)
        np.testing.assert_allclose(s[idx], np.where(small, sil - 0.15, -3.0))
    assert meta["flagged_classes"] == [TARGET]
    # Only the planted class is attacked, and what it flags (its smaller cluster) is poison.
    flagged = s > 0
    assert meta["n_flagged"] == flagged.sum() > 0 and poisoned[flagged].all()
    assert roc_auc_score(poisoned, s) > 0.6


def test_activation_clustering_rules_match_a_direct_computation(tmp_path):
    """LfD's variant keeps the larger cluster of every class; Trojan-zoo's code flags a class when
    its silhouette > 0.1 and its smaller cluster holds < 35% of it."""
    feats, labels, poisoned = _planted()
    inp = _inputs(tmp_path, feats, labels, poisoned)
    larger, meta_l = _score(tmp_path, inp, "activation_clustering", "larger", group_by="label", rule="larger_cluster")
    relsize, meta_r = _score(tmp_path, inp, "activation_clustering", "rel", group_by="label", rule="relative_size",
                             silhouette_threshold=0.1)
    for c in range(N_CLASSES):
        idx = np.flatnonzero(labels == c)
        seed = int(np.random.SeedSequence([0, c]).generate_state(1)[0] % (2**31))
        sil, small = _direct_ac(feats[idx], seed)
        share = small.mean()
        np.testing.assert_allclose(larger[idx], np.where(small, 1 - share, -3.0))
        want = min(sil - 0.1, 0.35 - share)
        np.testing.assert_allclose(relsize[idx], np.where(small, want, -3.0))
        assert meta_r["classes"][c]["attacked"] == (sil > 0.1 and share < 0.35)
    assert meta_l["flagged_classes"] == list(range(N_CLASSES))  # no test: every class loses its smaller cluster
    assert meta_l["n_flagged"] == (larger > 0).sum() > (relsize > 0).sum()


def test_both_rank_planted_poison_and_ignore_ground_truth(tmp_path):
    feats, labels, poisoned = _planted(seed=1)
    # A last layer that predicts the label from the class centres (nearest-centre rule).
    mu = np.stack([feats[labels == c].mean(0) for c in range(N_CLASSES)])
    linear = (mu.astype(np.float32), (-0.5 * (mu ** 2).sum(1)).astype(np.float32))
    inp = _inputs(tmp_path, feats, labels, poisoned, linear=linear)
    shuf = _inputs(tmp_path, feats, labels, poisoned, shuffled=True, linear=linear)
    target = labels == TARGET
    for dtype, params in (("spectral_signatures", {}), ("spectral_signatures", {"per_class_rank": False}),
                          ("activation_clustering", {})):
        s, meta = _score(tmp_path, inp, dtype, **params)
        s2, _ = _score(tmp_path, shuf, dtype, "shuffled", **params)
        np.testing.assert_array_equal(s, s2)
        if dtype == "spectral_signatures":
            # Both ranks are within a class (tau is not comparable across classes): the poison
            # tops its own class.
            assert roc_auc_score(poisoned[target], s[target]) > 0.9
        else:
            assert poisoned[s > 0].all() and roc_auc_score(poisoned, s) > 0.6
        if dtype == "activation_clustering":  # grouped by predicted class
            assert meta["flagged_classes"] == [TARGET] and meta["classes"][TARGET]["n"] == PER_CLASS


def test_activation_clustering_small_classes_do_not_crash(tmp_path):
    feats, labels, poisoned = _planted()
    labels = labels.copy()
    labels[:2] = 5  # two examples: skipped
    labels[2:7] = 6  # five examples: fewer than 10 components
    inp = _inputs(tmp_path, feats, labels, poisoned)
    s, meta = _score(tmp_path, inp, "activation_clustering", group_by="label")
    assert "skipped" in meta["classes"][5] and (s[:2] == -3).all()
    assert meta["classes"][6]["components"] == 4 and np.isfinite(s).all()


def test_remove_flagged_drops_exactly_flagged(tmp_path):
    feats, labels, poisoned = _planted()
    inp = _inputs(tmp_path, feats, labels, poisoned)
    s, meta = _score(tmp_path, inp, "activation_clustering", "ac", group_by="label")
    pm = stages.plan({"defense": "ac", "detector": "d", "remedy": "remove_flagged"},
                     {"manifest": inp["manifest"], "bona_fide": inp["bona_fide"], "scores": tmp_path / "ac.parquet"}, {"out": tmp_path / "plan.parquet"})
    pl = pd.read_parquet(tmp_path / "plan.parquet")
    flagged = (s > 0) & ~_manifest(labels, poisoned)["bona_fide"].to_numpy()
    assert ((pl["weight"] == 0).to_numpy() == flagged).all() and pm["n_removed"] == flagged.sum() > 0
    assert meta["n_flagged"] == (s > 0).sum()
    # Never a bona fide example, whatever its score.
    man = _manifest(labels, poisoned)
    sc = np.linspace(-1, 1, len(man))
    w = REMEDIES.get("remove_flagged")(threshold=0.5).weights(sc, man, {})
    assert ((w == 0) == ((sc > 0.5) & ~man["bona_fide"].to_numpy())).all()


@pytest.mark.parametrize("det, bad", [
    ({"type": "activation_clustering", "group_by": "pred"}, "group_by"),
    ({"type": "activation_clustering", "silhouette_threshold": 1.5}, "silhouette_threshold"),
    ({"type": "activation_clustering", "n_components": 0}, "n_components"),
    ({"type": "activation_clustering", "n_components": 2.5}, "n_components"),
    ({"type": "activation_clustering", "k": 3}, "k"),
    ({"type": "spectral_signatures", "per_class_rank": 1}, "per_class_rank"),
])
def test_bad_detector_params(det, bad):
    cfg = {"bona_fide": {"n_clean": 0}, "defender_models": {"attacked": {}}}
    with pytest.raises(ConfigError, match=bad):
        DETECTORS.get(det["type"]).check(det, "detectors.x", cfg, planted.bona(cfg))


def test_bad_remedy_params():
    cfg = {"detectors": {"ac": {}}, "defender_models": {"attacked": {}}}
    for bad in ("high", True, float("nan")):
        with pytest.raises(ConfigError, match="threshold"):
            REMEDIES.get("remove_flagged").check({"remedy": "remove_flagged", "detector": "ac", "threshold": bad}, "defenses.x", cfg, planted.bona(cfg))
    assert REMEDIES.get("remove_flagged").check({"remedy": "remove_flagged", "detector": "ac"}, "defenses.x", cfg, planted.bona(cfg)) == {"threshold": 0.0}


def test_demo_config_accepts_the_entries():
    cfg = config.load("configs/demo.yaml", {
        "detectors": {"ss": {"type": "spectral_signatures"}, "ac": {"type": "activation_clustering"}},
        "defenses": {"ss": {"detector": "ss", "remedy": "remove", "r_reject": 0.15},
                     "ac": {"detector": "ac", "remedy": "remove_flagged"}}}, deep=False)
    assert cfg["detectors"]["ac"]["type"] == "activation_clustering"
