import numpy as np
import pandas as pd
import pytest

from planted import DEFAULT_CELL, files, write_manifest
from poisongrid import stages, trajectories
from poisongrid.detectors import read_scores
from poisongrid.knn import knn_log_distance
from poisongrid.detectors.badloss import BaDLoss
from poisongrid.errors import ArtifactError, ConfigError
from poisongrid.remedies import select_removed


def brute_force(x, ref, k, eps):
    out = []
    for row in x:
        d = np.sort(np.sqrt(((ref - row) ** 2).sum(1)))[:k]
        out.append(np.log(d.mean() + eps))
    return np.array(out)


def test_knn_score_equals_brute_force():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 1.0, size=(500, 12)).astype(np.float32)
    ref = rng.gamma(2.0, 1.0, size=(40, 12)).astype(np.float32)
    got = knn_log_distance(x, ref, k=7, eps=1e-8, chunk=64)
    np.testing.assert_allclose(got, brute_force(x.astype(float), ref.astype(float), 7, 1e-8), rtol=1e-5, atol=1e-5)


def test_knn_k_equal_ref_and_self_distance():
    ref = np.eye(5, dtype=np.float32)
    got = knn_log_distance(ref, ref, k=5)
    np.testing.assert_allclose(got, brute_force(ref, ref, 5, 1e-8), rtol=1e-5)
    with pytest.raises(ConfigError, match="k"):
        knn_log_distance(ref, ref, k=6)


def test_knn_score_equals_sklearn_with_duplicates_chunks_and_threads():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(3)
    base = rng.gamma(2.0, 0.5, size=(60, 30)).astype(np.float32)
    ref = np.concatenate([base[:40], base[:5], base[:5]])  # each of the first five three times
    x = np.concatenate([base, base[:10], rng.gamma(2.0, 0.5, size=(931, 30)).astype(np.float32)])
    for k in (1, 4, 7, 50):
        dist, _ = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(ref).kneighbors(x)
        want = dist.mean(1)
        # Chunk boundaries that do not divide the row count, one thread and two.
        for chunk, workers in ((1024, 1), (97, 2), (64, 1)):
            got = np.exp(knn_log_distance(x, ref, k, eps=1e-8, chunk=chunk, workers=workers)) - 1e-8
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"k={k} chunk={chunk}")
    # Rows that equal a reference row three times over are at distance 0 from their three nearest.
    np.testing.assert_array_equal(knn_log_distance(base[:5], ref, 3), np.log(1e-8))


def test_knn_score_float64_input_and_empty():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 8))
    ref = rng.normal(size=(20, 8))
    np.testing.assert_allclose(knn_log_distance(x, ref, 5, chunk=50, workers=2), brute_force(x, ref, 5, 1e-8), rtol=1e-5, atol=1e-5)
    assert knn_log_distance(x[:0], ref, 5).shape == (0,)


def test_spike_epochs_skipped():
    means = [2.0, 1.5, 1.2, 1.0, 9.0, 0.9, 0.8, 5.0, 0.7]
    for rule in ("paper", "reference"):
        assert trajectories.accepted_epochs(means, 2.0, rule) == [0, 1, 2, 3, 5, 6, 8]
    # The paper checks every epoch against the kept ones before it (Algorithm 1: the mean of up to
    # the last three); the authors' code keeps epochs 0-2 however high they are.
    assert trajectories.accepted_epochs([1.0, 50.0, 70.0, 1.0], rule="paper") == [0, 3]
    assert trajectories.accepted_epochs([1.0, 1.5, 4.0, 1.0], rule="paper") == [0, 1, 3]  # 4 > 2 * mean(1, 1.5)
    assert trajectories.accepted_epochs([1.0, 50.0, 70.0, 1.0], rule="reference") == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        trajectories.accepted_epochs(means, 2.0, "median")


def _write_cell(tmp_path, n=300, epochs=6, n_bona=30, skipped=(3,)):
    rng = np.random.default_rng(1)
    curve = np.linspace(2.0, 0.5, epochs)[:, None]
    losses = (curve * rng.lognormal(0.0, 0.1, size=(epochs, n))).astype(np.float32)
    poisoned = np.arange(n) >= n - 30
    losses[:, poisoned] *= 0.05  # planted: poisoned examples learned far faster
    losses[3, :] += 100  # spike epoch: must not be used by the score
    kept = [e for e in range(epochs) if e not in skipped]
    tpath = tmp_path / "traj.parquet"
    trajectories.write(tpath, losses, {"cell": {**DEFAULT_CELL, "model": "pretrain"}, "epochs_recorded": epochs, "accepted_epochs": kept, "skipped_epochs": list(skipped),
                                       "n_examples": n})
    bona = np.zeros(n, dtype=bool)
    bona[:n_bona] = True
    man = pd.DataFrame({"index": np.arange(n), "label": np.zeros(n, dtype=np.int64), "orig_label": np.zeros(n, dtype=np.int64),
                        "attack": pd.array([("patch" if p else None) for p in poisoned], dtype="string"),
                        "target": np.where(poisoned, 0, -1), "bona_fide": bona})
    mpath = tmp_path / "manifest.parquet"
    write_manifest(mpath, man)
    return tpath, mpath, losses, kept, bona, poisoned


def test_trajectory_file_one_row_per_example(tmp_path):
    tpath, _, losses, kept, _, _ = _write_cell(tmp_path)
    idx, t, md = trajectories.read(tpath)
    assert len(idx) == losses.shape[1] and t.shape == (losses.shape[1], len(kept))
    assert t.dtype == np.float32
    np.testing.assert_array_equal(t, losses[kept].T)
    _, full, _ = trajectories.read(tpath, only_accepted=False)
    assert full.shape[1] == losses.shape[0]


def test_badloss_detector_matches_reference_and_streams(tmp_path):
    tpath, mpath, losses, kept, bona, poisoned = _write_cell(tmp_path)
    out = tmp_path / "scores.parquet"
    det = BaDLoss(k=10, chunk_rows=37)
    det.view = stages.defender_view({"model": "pretrain"}, {"trajectories": tpath, **files(mpath)})
    det.score(out)
    df, meta = read_scores(out)
    assert meta["epochs_used"] == kept and meta["wall_time_s"] > 0
    x = losses[kept].T.astype(float)
    np.testing.assert_allclose(df["score"].to_numpy(), brute_force(x, x[bona], 10, 1e-8), rtol=1e-5, atol=1e-5)
    # The planted poisoned examples are the most anomalous.
    top = np.argsort(-df["score"].to_numpy())[: poisoned.sum()]
    assert poisoned[top].mean() > 0.9


def test_foreign_and_truncated_parquet_rejected(tmp_path):
    tpath, mpath, *_ = _write_cell(tmp_path)
    with pytest.raises(ArtifactError, match="expected 'trajectories'"):
        trajectories.read(mpath)
    foreign = tmp_path / "foreign.parquet"
    pd.DataFrame({"a": [1, 2]}).to_parquet(foreign)
    with pytest.raises(ArtifactError, match="not written by poisongrid"):
        trajectories.read(foreign)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(tpath.read_bytes()[: tpath.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        trajectories.read(cut)


def test_filter_exact_fraction_never_bona_fide():
    rng = np.random.default_rng(2)
    n = 1000
    scores = rng.normal(size=n)
    bona = np.zeros(n, dtype=bool)
    bona[np.argsort(-scores)[:50]] = True  # the bona fide hold the very highest scores
    removed = select_removed(scores, bona, 0.4)
    assert removed.sum() == 400
    assert not (removed & bona).any()
    # Everything removed scores at least as high as anything kept (bona fide aside).
    assert scores[removed].min() >= scores[~removed & ~bona].max()
    assert select_removed(scores, bona, 0.0).sum() == 0
