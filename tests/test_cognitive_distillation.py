"""Cognitive Distillation: batch-independent masks, small masks on a planted patch backdoor that
sit on the patch, parameter checks, and no use of the ground truth."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import planted
from poisongrid import config
from poisongrid.detectors import DETECTORS, read_scores
from poisongrid.detectors.cognitive_distillation import CognitiveDistillation, distill, example_noise, total_variation
from poisongrid.errors import ConfigError

N, SIZE, K, TARGET = 320, 16, 4, 2
BASE = np.array([[.6, .35, .35], [.35, .6, .35], [.35, .35, .6], [.55, .55, .3]])


def _colours(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class c: a faint colour cast BASE[c] under strong pixel noise (never white), so a clean
    image needs many of its pixels to keep the logits."""
    y = rng.integers(0, K, n)
    x = BASE[y][:, :, None, None] + rng.normal(0, 0.12, (n, 3, SIZE, SIZE))
    return (np.clip(x, 0, 0.85) * 255).astype(np.uint8), y


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(32, K))


@pytest.fixture(scope="module")
def backdoored():
    """A tiny CNN trained on noisy colour casts where 10% carry a white 3x3 top-left patch
    relabelled to class 2 (about a second on one CPU thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is faster than several on a busy machine
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y = _colours(N, rng)
    poisoned = np.zeros(N, bool)
    poisoned[rng.choice(N, N // 10, replace=False)] = True
    x[poisoned, :, :3, :3] = 255
    label = np.where(poisoned, TARGET, y)
    model = _tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x).float() / 255, torch.from_numpy(label)
    for _ in range(8):
        for idx in torch.randperm(N).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        clean_x, clean_y = _colours(200, np.random.default_rng(1))
        stamped = clean_x.copy()
        stamped[:, :, :3, :3] = 255
        acc = (model(torch.from_numpy(clean_x).float() / 255).argmax(1).numpy() == clean_y).mean()
        asr = (model(torch.from_numpy(stamped).float() / 255).argmax(1).numpy() == TARGET).mean()
    assert acc > 0.9 and asr > 0.9, (acc, asr)  # the planted backdoor works
    bona = np.zeros(N, bool)
    bona[np.flatnonzero(~poisoned)[:40]] = True
    man = pd.DataFrame({"index": np.arange(N, dtype=np.int64), "label": label.astype(np.int64),
                        "bona_fide": bona, "attack": pd.array(np.where(poisoned, "patch", None), dtype="string"),
                        "orig_label": y.astype(np.int64), "target": np.where(poisoned, TARGET, -1).astype(np.int64)})
    yield model, x, man, poisoned
    torch.set_num_threads(threads)


def _score(tmp_path, model, images, man, name="s", **params):
    det = CognitiveDistillation(**params)
    det.cell = {"dataset": "synthetic", "scenario": "patch", "seed": 0}
    det.view = planted.view(images, man["label"].to_numpy(), man["bona_fide"].to_numpy(), model, index=man["index"].to_numpy())
    meta = det.score(tmp_path / f"{name}.parquet")
    df, _ = read_scores(tmp_path / f"{name}.parquet")
    return df.set_index("index")["score"].loc[man["index"]].to_numpy(), meta  # in the manifest's row order


def _auroc(score, positive):
    pos, neg = score[positive], score[~positive]
    return ((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def test_tv_and_noise_by_hand():
    m = torch.zeros(1, 1, 2, 3)
    m[0, 0, 0, 1] = 1.0  # 2 horizontal neighbours + 1 vertical neighbour differ by 1
    assert total_variation(m).item() == pytest.approx(3 / 6)
    gen = planted.view(labels=np.zeros(1, np.int64), seed=3).generator
    a = example_noise(gen, np.array([5, 9, 2]), 4, 3)
    b = example_noise(gen, np.array([2, 5]), 4, 3)
    assert a.shape == (3, 4, 3) and 0 <= a.min() and a.max() < 1
    torch.testing.assert_close(a[[2, 0]], b)  # an example's colours follow its index, not its batch


def test_batched_masks_equal_masks_optimised_alone(backdoored):
    model, x, man, _ = backdoored
    model.requires_grad_(False)
    rows = np.array([0, 7, 11, 42, 300, 319])
    xf = torch.from_numpy(x[rows]).float() / 255
    noise = example_noise(planted.view(labels=np.zeros(1, np.int64), seed=0).generator, rows, 30, 3)
    together = distill(model, xf, noise)
    alone = torch.cat([distill(model, xf[i:i + 1], noise[i:i + 1]) for i in range(len(rows))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # The same through the detector: batch size changes nothing.
    det = CognitiveDistillation(steps=30, batch_size=4)
    det.view = planted.view(x, man["label"].to_numpy(), man["bona_fide"].to_numpy(), model)
    torch.testing.assert_close(det.masks(rows, rows), together, atol=1e-5, rtol=1e-5)


def test_poisoned_images_get_small_masks_on_the_patch(backdoored, tmp_path):
    model, x, man, poisoned = backdoored
    # Scoring the whole training set takes a while on a CPU: score all 32 poisoned and 48 clean.
    rows = np.concatenate([np.flatnonzero(poisoned), np.flatnonzero(~poisoned)[:48]])
    sub = man.iloc[rows].reset_index(drop=True)
    score, meta = _score(tmp_path, model, x[rows], sub, batch_size=64)
    pois = poisoned[rows]
    assert _auroc(score, pois) > 0.8
    assert meta["images_per_s"] > 0 and meta["forward_backward_passes"] == len(rows) * 100 and meta["mask_pixels"] == SIZE * SIZE
    assert meta["norm_min"] == pytest.approx(-score.max()) and set(meta["norm_mean_by_label"]) <= set(range(K))
    # Where the masks sit: a poisoned image keeps its patch whole and much less of the rest;
    # clean images keep that corner no more than the rest.
    det = CognitiveDistillation()
    det.view = planted.view(x, man["label"].to_numpy(), man["bona_fide"].to_numpy(), model)
    m = det.masks(rows, rows)[:, 0]
    corner = m[:, :3, :3].mean((1, 2))
    rest = (m.sum((1, 2)) - m[:, :3, :3].sum((1, 2))) / (SIZE * SIZE - 9)
    assert (corner[pois] > 0.95).all()
    assert (corner[pois] - rest[pois] > 0.15).float().mean() >= 0.75, (corner[pois], rest[pois])
    assert (corner - rest)[pois].mean() > (corner - rest)[~pois].mean() + 0.1


def test_scores_ignore_the_ground_truth(backdoored, tmp_path):
    model, x, man, _ = backdoored
    sub = man.iloc[:24].reset_index(drop=True)
    rng = np.random.default_rng(5)
    shuffled = sub.assign(attack=sub["attack"].to_numpy()[rng.permutation(24)], orig_label=rng.integers(0, K, 24),
                          target=sub["target"].to_numpy()[::-1])
    a, _ = _score(tmp_path, model, x, sub, "a", steps=10, batch_size=8)
    b, _ = _score(tmp_path, model, x, shuffled, "b", steps=10, batch_size=8)
    np.testing.assert_array_equal(a, b)


def _cfg(**det):
    return {"bona_fide": {"n_clean": 60}, "defender_models": {"attacked": {}}}, {"type": "cognitive_distillation", **det}


@pytest.mark.parametrize("bad", [{"steps": 0}, {"steps": 2.5}, {"batch_size": 0}, {"lr": 0}, {"alpha": -1},
                                 {"beta": -0.1}, {"max_images": 100}, {"amp": 1}, {"model": "nope"}, {"steps": True}])
def test_bad_params_are_config_errors(bad):
    cfg, det = _cfg(**bad)
    with pytest.raises(ConfigError):
        DETECTORS.get("cognitive_distillation").check(det, "detectors.cd", cfg, planted.bona(cfg))


def test_config_accepts_the_badloss_setup():
    cfg, det = _cfg(steps=100, batch_size=512, alpha=0.0)
    CognitiveDistillation.check(det, "detectors.cd", cfg, planted.bona(cfg))
    c = config.validate({"device": "cpu", "bona_fide": {"n_clean": 60},
                         "datasets": {"digits": {"image_size": 16, "model": "smallcnn", "epochs": 1, "batch_size": 64,
                                                 "attacks": {"patch": {"ratio": 0.05}}}},
                         "detectors": {"cd": {"type": "cognitive_distillation"}},
                         "defenses": {"cd": {"detector": "cd", "remedy": "remove", "r_reject": 0.15}}})
    assert c["detectors"]["cd"]["type"] == "cognitive_distillation"
    with pytest.raises(ConfigError):
        config.validate({**c, "detectors": {"cd": {"type": "cognitive_distillation", "steps": -3}}})


@pytest.mark.slow
def test_digits_cell_end_to_end(tmp_path):
    """Poison a digits cell, train the attacked model, score every training example through the
    real defender view (poisoned images, the attacked model) and plan BaDLoss's 15% removal."""
    from poisongrid.jobs import run_job
    from poisongrid.stages import read_plan

    cfg = config.validate({"device": "cpu", "bona_fide": {"n_clean": 60},
                           "datasets": {"digits": {"image_size": 16, "model": "smallcnn", "epochs": 2, "batch_size": 64,
                                                   "attacks": {"patch": {"ratio": 0.05}}}},
                           "detectors": {"cd": {"type": "cognitive_distillation", "steps": 3, "batch_size": 512}},
                           "defenses": {"cd": {"detector": "cd", "remedy": "remove", "r_reject": 0.15}}})

    def run(stage, **extra):
        return run_job(cfg, stage, str(tmp_path), dataset="digits", scenario="single-patch", seed=0, **extra)

    run("poison")
    run("bonafide")
    run("pretrain", model="attacked")
    run("score", detector="cd")
    run("plan", defense="cd")
    from poisongrid import paths

    where = dict(dataset="digits", scenario="single-patch", seed=0)
    df, meta = read_scores(paths.path("scores", str(tmp_path), detector="cd", **where))
    n = len(df)
    assert n == 1437 and df["index"].is_unique and (df["score"] < 0).all()
    assert meta["forward_backward_passes"] == 3 * n and meta["norm_max"] <= 16 * 16
    _, _, pmeta = read_plan(paths.path("plan", str(tmp_path), defense="cd", **where), np.arange(n))
    assert pmeta["n_removed"] == pytest.approx(0.15 * n, abs=2)
