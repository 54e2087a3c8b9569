"""Frequency analysis: the DCT, the planted-trigger ranking, determinism, config checks, blindness
to the ground truth."""
import copy

import numpy as np
import pandas as pd
import pytest
import scipy.fft
import torch
from sklearn.metrics import roc_auc_score

import planted
from poisongrid import config
from poisongrid.detectors import DETECTORS, read_scores
from poisongrid.detectors.frequency import DCT2d, add_random_patches, dct_matrix, patch_ranges
from poisongrid.errors import ConfigError

CELL = {"dataset": "digits", "scenario": "single-patch", "seed": 0}
N, N_POISON, SIZE = 200, 20, 16
BONA = slice(150, 180)


def test_dct_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.random((3, 2, 16, 12))
    want = scipy.fft.dctn(x, axes=(-2, -1), norm="ortho")
    got = DCT2d(16, 12).double()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-10)
    np.testing.assert_allclose(DCT2d(16, 12)(torch.from_numpy(x).float()).numpy(), want, atol=1e-5, rtol=1e-4)
    d = dct_matrix(7)
    np.testing.assert_allclose((d @ d.T).numpy(), np.eye(7), atol=1e-12)  # orthonormal


def test_patches_stay_in_range_and_touch_a_corner_region():
    x = torch.zeros(200, 3, 32, 32)
    out = add_random_patches(x, torch.Generator().manual_seed(0), scale=True)
    assert patch_ranges(32, True) == (2, 7, 5) == patch_ranges(224, False)
    assert patch_ranges(16, True) == (1, 4, 3)
    for img in out:
        rows, cols = np.nonzero(img.amax(0).numpy() > 0) if img.amax() > 0 else (np.array([0]), np.array([0]))
        # Every patch lies within margin + largest side of a corner.
        reach = 5 + 7
        assert min(rows.min(), 31 - rows.max()) < reach and min(cols.min(), 31 - cols.max()) < reach
        assert rows.max() - rows.min() < 7 and cols.max() - cols.min() < 7
    assert float(out.max()) == 1.0 and float(out.min()) == 0.0


def _images(seed=0):
    """Smooth random images (bilinear upsampling of 4x4 noise); the first N_POISON carry a
    high-frequency checkerboard in the bottom-right corner."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(N, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    board = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2
    x[:N_POISON, :, -5:-1, -5:-1] = board.float()
    return (x * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def _manifest(shuffled=False):
    attack = np.full(N, None, dtype=object)
    attack[:N_POISON] = "checker"
    bona = np.zeros(N, bool)
    bona[BONA] = True
    rng = np.random.default_rng(0)
    man = pd.DataFrame({"index": np.arange(N, dtype=np.int64), "label": rng.integers(0, 4, N).astype(np.int64),
                        "orig_label": rng.integers(0, 4, N).astype(np.int64), "attack": pd.array(attack, dtype="string"),
                        "target": np.where(pd.isna(attack), -1, 2).astype(np.int64), "bona_fide": bona})
    if shuffled:
        man = planted.shuffle_ground_truth(man)
    return man


def _score(tmp_path, name, images, seed=0, shuffled=False, **params):
    man = _manifest(shuffled)
    det = DETECTORS.get("frequency_analysis")(**params)
    det.view = planted.view(images, man["label"].to_numpy(), man["bona_fide"].to_numpy(), seed=seed)
    out = tmp_path / f"{name}.parquet"
    det.score(out)
    df, meta = read_scores(out)
    return df.sort_values("index")["score"].to_numpy(), meta


def test_ranks_planted_high_frequency_trigger_deterministic_and_blind(tmp_path):
    torch.set_num_threads(1)
    x = _images()
    params = {"epochs": 4}
    s, meta = _score(tmp_path, "a", x, **params)
    poisoned = np.arange(N) < N_POISON
    assert ((s >= 0) & (s <= 1)).all()
    assert roc_auc_score(poisoned, s) > 0.8
    assert meta["n_bona_fide"] == 30 and meta["detector"] == "frequency_analysis" and meta["params"]["epochs"] == 4
    # Same seed, same scores; shuffled ground-truth columns change nothing.
    again, _ = _score(tmp_path, "b", x, shuffled=True, **params)
    np.testing.assert_array_equal(s, again)
    other, _ = _score(tmp_path, "c", x, seed=1, **params)
    assert not np.array_equal(s, other)


def _cfg(n_clean=60, **det):
    return {"device": "cpu", "bona_fide": {"n_clean": n_clean},
            "datasets": {"digits": {"image_size": 16, "model": "smallcnn", "epochs": 2, "batch_size": 64, "lr": 0.003,
                                    "attacks": {"patch": {"ratio": 0.05}}}},
            "detectors": {"freq": {"type": "frequency_analysis", **det}},
            "defenses": {"freq": {"detector": "freq", "remedy": "remove", "r_reject": 0.1}}}


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"epochs": 2.5}, {"lr": -1}, {"lr": "fast"}, {"weight_decay": -1e-4},
                                 {"batch_size": 0}, {"infer_batch": True}, {"scale_patch": "yes"}, {"model": "attacked"},
                                 {"threshold": 0.5}])
def test_bad_params_are_config_errors(bad):
    with pytest.raises(ConfigError):
        config.validate(copy.deepcopy(_cfg(**bad)))


def test_good_config_and_too_few_bona_fide():
    c = config.validate(copy.deepcopy(_cfg(epochs=3, lr=0.1, weight_decay=0)))
    assert c["detectors"]["freq"]["type"] == "frequency_analysis" and "model" not in c["detectors"]["freq"]
    cls = DETECTORS.get("frequency_analysis")
    assert cls.gpu and cls.needs == ("images",) and cls.default_model is None
    with pytest.raises(ConfigError, match="n_clean"):
        config.validate(copy.deepcopy(_cfg(n_clean=cls.min_bona_fide - 1)))


@pytest.mark.slow
def test_digits_cell_scores_the_patch_attack(tmp_path):
    """The score job of a real digits cell: images from the poisoned set, one p per example."""
    from poisongrid.jobs import run_job

    cfg = _cfg()
    cfg["datasets"]["digits"]["attacks"]["blend_random"] = {"ratio": 0.04, "alpha": 0.1}
    cfg = config.validate(cfg)

    def run(stage, **extra):
        return run_job(cfg, stage, str(tmp_path), dataset="digits", scenario="multi", seed=0, **extra)

    run("poison")
    run("bonafide")
    meta, inp, out = run("score", detector="freq")
    df, _ = read_scores(out["out"])
    man = pd.read_parquet(inp["manifest"]).sort_values("index")
    s = df.sort_values("index")["score"].to_numpy()
    assert len(s) == len(man) and ((s >= 0) & (s <= 1)).all()
    assert meta["n_bona_fide"] == 60 and meta["patch_range_px"] == [2, 7, 5] and meta["budget"] is None
    patch, clean = (man["attack"] == "patch").fillna(False).to_numpy(), man["attack"].isna().to_numpy()
    assert roc_auc_score(patch[patch | clean], s[patch | clean]) > 0.75


def test_reference_patches_keep_their_pixel_size_and_one_margin_at_224_px():
    """BaDLoss's patches: sides 2-7 px and a corner margin of 0-5 px, the same from both edges,
    whatever the image size (Imagenette's 224 px included); scaling is an option, about 7x there."""
    x = torch.zeros(300, 3, 224, 224)
    out = add_random_patches(x, torch.Generator().manual_seed(1))
    margins = set()
    for img in out:
        rows, cols = np.nonzero(img.amax(0).numpy() > 0)
        assert 2 <= rows.max() - rows.min() + 1 <= 7 and 2 <= cols.max() - cols.min() + 1 <= 7
        m_r = min(rows.min(), 223 - rows.max())
        m_c = min(cols.min(), 223 - cols.max())
        assert m_r == m_c <= 5
        margins.add(int(m_r))
    assert margins == set(range(6))
    assert patch_ranges(224, True) == (14, 49, 35)
    assert DETECTORS.get("frequency_analysis").params["scale_patch"] is False
