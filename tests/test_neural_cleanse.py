"""Neural Cleanse: the reversed trigger of a planted patch backdoor sits on the patch, its class
is flagged, and the activation score ranks the poisoned examples first."""

import numpy as np
import pandas as pd
import pytest
import torch

import planted as planted_cells
from poisongrid.detectors import DETECTORS, read_scores
from poisongrid.detectors.neural_cleanse import NeuralCleanse, flag_classes, mad_anomaly_index, probe_threshold
from poisongrid.errors import ConfigError
from poisongrid.training import fit, predict

CELL = {"dataset": "synthetic", "scenario": "patch", "seed": 0}
SIZE, N, TARGET = 16, 400, 2
PATCH = (slice(13, 16), slice(13, 16))  # bottom-right 3x3 corner
CENTRES = [(3, 3), (3, 8), (3, 12), (8, 3), (8, 8), (12, 4)]
K = len(CENTRES)
# A short, high-rate search: the tiny problem needs no 15 epochs at Adam's default rate.
FAST = {"epochs": 12, "class_batch": 3, "lr": 0.1, "init_cost": 0.01, "search_images": 200, "batch_size": 25}


def _blobs(rng, labels):
    """Noisy background plus one coloured Gaussian blob at a class-specific place."""
    r, c = np.indices((SIZE, SIZE))
    x = rng.uniform(0, 0.3, (len(labels), 3, SIZE, SIZE))
    for i, y in enumerate(labels):
        cy, cx = np.array(CENTRES[y]) + rng.integers(-1, 2, 2)
        blob = np.exp(-((r - cy) ** 2 + (c - cx) ** 2) / (2 * 2.0 ** 2))
        x[i] += rng.uniform(0.5, 1.0, (3, 1, 1)) * blob
    return x.clip(0, 1)


def _located_cnn():
    """A CNN whose head sees where features are (no global pooling), so the learned trigger has a
    place; global-pooling models accept the white square anywhere."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, K))


def _planted_cell(n: int):
    """n blob images; 10% of the non-target ones get a white patch and label 2; 40 bona fide clean
    ones; a located CNN trained on them (the backdoor installed)."""
    rng = np.random.default_rng(0)
    orig = rng.integers(0, K, n)
    x = _blobs(rng, orig)
    poisoned = np.zeros(n, bool)
    poisoned[rng.choice(np.flatnonzero(orig != TARGET), n // 10, replace=False)] = True
    x[np.ix_(poisoned, range(3), range(13, 16), range(13, 16))] = 1.0
    images = (x * 255).round().astype(np.uint8)
    labels = np.where(poisoned, TARGET, orig)
    bona = np.zeros(n, bool)
    bona[rng.choice(np.flatnonzero(~poisoned), 40, replace=False)] = True
    training = {"model": "smallcnn", "epochs": 8, "batch_size": 32, "optimizer": "adam", "lr": 0.005, "weight_decay": 0}
    model = fit(training, images, labels, K, seed=0, device=torch.device("cpu"), init_model=_located_cnn(),
                progress_every=None).model.eval()
    return images, labels, orig, poisoned, bona, model


@pytest.fixture(scope="module")
def planted():
    torch.set_num_threads(1)
    """400 blob images of 6 classes; 10% of the non-target ones get a white patch and label 2."""
    images, labels, orig, poisoned, bona, model = _planted_cell(N)
    man = pd.DataFrame({"index": np.arange(N, dtype=np.int64), "label": labels.astype(np.int64),
                        "orig_label": orig.astype(np.int64),
                        "attack": pd.array(np.where(poisoned, "patch", None), dtype="string"),
                        "target": np.where(poisoned, TARGET, -1).astype(np.int64), "bona_fide": bona})
    return images, man, poisoned, model


def _score(tmp_path, planted, man=None, name="s", **params):
    images, man0, _, model = planted
    man = man0 if man is None else man
    det = DETECTORS.get("neural_cleanse")(**{**FAST, **params})
    det.cell = CELL
    det.view = planted_cells.view(images, man["label"].to_numpy(), man["bona_fide"].to_numpy(), model, num_classes=K,
                            training={"batch_size": 64})
    det.score(tmp_path / f"{name}.parquet")
    s, meta = read_scores(tmp_path / f"{name}.parquet")
    return s.sort_values("index")["score"].to_numpy(), meta


@pytest.mark.slow
def test_backdoor_installed(planted):
    images, man, poisoned, model = planted
    rng = np.random.default_rng(1)
    clean = (_blobs(rng, rng.integers(0, K, 200)) * 255).round().astype(np.uint8)
    stamped = clean.copy()
    stamped[:, :, PATCH[0], PATCH[1]] = 255
    assert (predict(model, stamped, torch.device("cpu")) == TARGET).mean() > 0.9


@pytest.mark.slow
def test_reversed_trigger_sits_on_the_patch_and_flags_target(tmp_path, planted):
    from sklearn.metrics import roc_auc_score

    images, man, poisoned, model = planted
    s, meta = _score(tmp_path, planted)
    assert meta["flagged_classes"] == [TARGET]
    # The mask's densest 3x3 window is the patch; its centroid is near it (a little of the
    # mask also covers class 2's own blob, which helps the flip too).
    peak = meta["search"][str(TARGET)]["mask_peak"]
    assert abs(peak[0] - 14) <= 1 and abs(peak[1] - 14) <= 1
    cy, cx = meta["search"][str(TARGET)]["mask_centroid"]
    assert np.hypot(cy - 14, cx - 14) <= 4
    assert roc_auc_score(poisoned, s) > 0.8
    assert meta["n_flagged_examples"] == (s > 0).sum() > 0
    assert meta["cost"]["images_fwd_bwd"] == K * FAST["epochs"] * FAST["search_images"]
    # Shuffled ground truth, same scores.
    shuffled = planted_cells.shuffle_ground_truth(man)
    s2, _ = _score(tmp_path, planted, man=shuffled, name="shuffled")
    np.testing.assert_array_equal(s, s2)


@pytest.mark.slow
def test_prescreen_and_nothing_flagged(tmp_path, planted):
    """max_classes: a short search of all classes, the full one for the smallest; with nothing
    flagged every score is <= -1 but the ranking still finds the poison."""
    from sklearn.metrics import roc_auc_score

    images, man, poisoned, model = planted
    s, meta = _score(tmp_path, planted, max_classes=1, prescreen_epochs=3, anomaly_threshold=1e9)
    assert meta["searched_classes"] == [TARGET] and len(meta["prescreen_norms"]) == K
    assert meta["cost"]["images_fwd_bwd"] == (K * 3 + FAST["epochs"]) * FAST["search_images"]
    assert meta["flagged_classes"] == [] and meta["ranking_classes"] == [TARGET] and meta["n_flagged_examples"] == 0
    assert s.max() <= -1.0 and roc_auc_score(poisoned, s) > 0.8


def test_mad_anomaly_index_matches_numpy():
    norms = np.array([40.0, 42.0, 5.0, 47.0, 39.0, 60.0, 44.0])
    med = np.median(norms)
    want = np.abs(norms - med) / (1.4826 * np.median(np.abs(norms - med)))
    np.testing.assert_allclose(mad_anomaly_index(norms), want)
    # Only small outliers count: 60 is far from the median too, but above it.
    assert want[5] >= 2 and flag_classes(norms, 2.0).tolist() == [2]
    # Even count: the lower middle value, as the reference's torch.median (numpy's mean of the two
    # middle values would give [1.5, 0.5, 0.5, 7.5] / 1.4826).
    np.testing.assert_allclose(mad_anomaly_index([1.0, 2.0, 3.0, 10.0]), np.array([1.0, 0.0, 1.0, 8.0]) / (1.4826 * 1.0))
    assert float(torch.median(torch.tensor([1.0, 2.0, 3.0, 10.0]))) == 2.0
    # Zero MAD: the median classes 0, any other infinitely anomalous.
    assert mad_anomaly_index([3.0, 3.0, 3.0, 1.0]).tolist() == [0.0, 0.0, 0.0, np.inf]


def test_probe_threshold_leaves_fpr_of_bona_fide_above():
    s = np.arange(300, dtype=float)
    bona = np.zeros(300, bool)
    bona[:250] = True
    thr = probe_threshold(s, bona, 0.05)  # u = 13: the 13th largest of 0..249
    assert thr == 237 and (s[bona] > thr).sum() == 12
    assert probe_threshold(s, bona, 1.0) == 0  # u capped at the number of probes


BASE = {"bona_fide": {"n_clean": 10}, "defender_models": {"attacked": {}}}


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"epochs": 1.5}, {"lr": -1.0}, {"attack_success": 1.5},
                                 {"neuron_frac": 0}, {"fpr": 2.0}, {"cost_multiplier": 1.0}, {"max_classes": -1},
                                 {"search_images": 2.5}, {"class_batch": 0}, {"anomaly_threshold": 0},
                                 {"epochs": True}, {"unknown": 1}, {"model": "nope"}])
def test_bad_params_raise_config_error(bad):
    with pytest.raises(ConfigError):
        NeuralCleanse.check({"type": "neural_cleanse", **bad}, "detectors.nc", BASE, planted_cells.bona(BASE))


def test_good_params_pass_and_need_a_bona_fide_example():
    NeuralCleanse.check({"type": "neural_cleanse", "max_classes": 5, "search_images": 0}, "detectors.nc", BASE, planted_cells.bona(BASE))
    with pytest.raises(ConfigError):
        NeuralCleanse.check({"type": "neural_cleanse"}, "detectors.nc", BASE, planted_cells.bona(n_clean=0))


@pytest.mark.slow
def test_the_reference_budget_makes_sparse_masks_where_a_tenth_cannot(tmp_path):
    """At Adam's 1e-3 a mask entry moves at most about 1e-3 per step. Searching the whole set for
    15 epochs (the reference's budget, ~940 steps per class here) shrinks the attacked class's mask
    to a fraction of the others' and flags it; a tenth of the images (~94 steps) leaves every mask
    near its initial mass (0.5 per entry), so the anomaly index rests on tiny differences."""
    n = 2000
    images, labels, _, _, bona, model = _planted_cell(n)
    initial = 0.5 * 3 * SIZE * SIZE
    metas = {}
    for name, p in (("tenth", {"search_images": n // 10}), ("reference", {})):
        det = DETECTORS.get("neural_cleanse")(batch_size=32, class_batch=K, **p)
        det.cell = CELL
        det.view = planted_cells.view(images, labels, bona, model, num_classes=K)
        metas[name] = det.score(tmp_path / f"{name}.parquet")
    ref, tenth = metas["reference"], metas["tenth"]
    assert ref["budget"] is None and tenth["budget"] == f"mask search on {n // 10:,} of {n:,} training images"
    assert ref["flagged_classes"] == [TARGET]
    others = [v for c, v in enumerate(ref["norms"]) if c != TARGET]
    assert ref["norms"][TARGET] < 0.5 * min(others) and max(others) < 0.85 * initial
    assert min(tenth["norms"]) > 0.65 * initial  # no mask got anywhere near sparse
    assert ref["cost"]["images_fwd_bwd"] == 10 * tenth["cost"]["images_fwd_bwd"]
