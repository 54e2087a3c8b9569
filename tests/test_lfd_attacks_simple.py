"""LfD attacks BN-W, BN-G, SIG, TJ-SQ, TJ-WM: exact trigger values and positions, labels, learning."""
import numpy as np
import pytest

from poisongrid import poisoning
from poisongrid.attacks import ATTACKS, build_attack
from poisongrid.attacks.base import LearnJob
from poisongrid.data import Dataset, Split
from poisongrid.errors import ConfigError

SHAPE = (3, 32, 32)


def _images(n=5, shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _outside_unchanged(x, y, mask):
    np.testing.assert_array_equal(y[:, :, ~mask], x[:, :, ~mask])


def _trojan_artifact(name, shape=SHAPE, seed=1, **params):
    mask = build_attack(name, shape, 0, params).mask
    trig = np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32) * mask
    return {"trigger": trig, "mask": mask}


# ---- BadNets ----------------------------------------------------------------------------------

def test_badnets_white_exact():
    x = _images()
    y = build_attack("badnets_white", SHAPE, 0).apply(x)
    mask = np.zeros((32, 32), bool)
    mask[29:32, 29:32] = True
    assert (y[:, :, mask] == 255).all()
    _outside_unchanged(x, y, mask)


def test_badnets_grid_exact_checkerboard_and_abl():
    x = _images()
    y = build_attack("badnets_grid", SHAPE, 0).apply(x)
    want = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]], np.uint8)  # BackdoorBench generate_grid.py
    for img in y:
        for ch in img:
            np.testing.assert_array_equal(ch[29:, 29:], want)
    mask = np.zeros((32, 32), bool)
    mask[29:, 29:] = True
    _outside_unchanged(x, y, mask)
    # ABL's grid: (H-1, W-1), (H-1, W-3), (H-2, W-2), (H-3, W-1) white, the rest black
    abl = build_attack("badnets_grid", SHAPE, 0, {"pattern": "abl"}).apply(x)
    white = {(31, 31), (31, 29), (30, 30), (29, 31)}
    for r in range(29, 32):
        for c in range(29, 32):
            assert (abl[:, :, r, c] == (255 if (r, c) in white else 0)).all()


def test_badnets_scaled_margin_and_corner():
    shape = (3, 224, 224)
    x = _images(2, shape)
    atk = build_attack("badnets_grid", shape, 0)
    assert atk.params["size"] == 24  # 3 cells of 224 // 28 = 8 px
    y = atk.apply(x)
    assert (y[:, :, 200:208, 200:208] == 255).all() and (y[:, :, 200:208, 208:216] == 0).all()
    assert (y[:, :, 216:224, 216:224] == 255).all()
    mask = np.zeros((224, 224), bool)
    mask[200:, 200:] = True
    _outside_unchanged(x, y, mask)
    x = _images()
    y = build_attack("badnets_white", SHAPE, 0, {"margin": 1, "corner": "top_left", "size": 4}).apply(x)
    mask = np.zeros((32, 32), bool)
    mask[1:5, 1:5] = True
    assert (y[:, :, mask] == 255).all()
    _outside_unchanged(x, y, mask)


# ---- SIG --------------------------------------------------------------------------------------

def test_sig_additive_formula_both_deltas():
    x = np.full((2, 3, 4, 8), 100, np.uint8)
    x[1, :, :, :] = 250  # near the top: clipping
    atk = build_attack("sig", (3, 4, 8), 0, {"delta_train": 20, "delta_test": 40, "frequency": 2})
    # f = 2 on m = 8 columns: sin(2 pi j 2 / 8) = sin(pi j / 2) = 0, 1, 0, -1, 0, 1, 0, -1
    s = np.array([0, 1, 0, -1, 0, 1, 0, -1], float)
    for got, delta in ((atk.apply(x), 40), (atk.poison(x, np.arange(2)), 20)):
        np.testing.assert_array_equal(got[0], np.broadcast_to(100 + delta * s, (3, 4, 8)))
        np.testing.assert_array_equal(got[1], np.broadcast_to(np.minimum(250 + delta * s, 255), (3, 4, 8)))
    # a non-integer value rounds: f = 6 on m = 32, column 1: 20 sin(2 pi 6 / 32) = 18.48
    y = build_attack("sig", SHAPE, 0).apply(np.full((1, *SHAPE), 100, np.uint8))
    assert y[0, 0, 0, 1] == 118 and y[0, 2, 31, 0] == 100


# ---- labels through poisoning ------------------------------------------------------------------

def _tiny_dataset(n=60, shape=(3, 16, 16), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    split = Split(rng.integers(0, 256, (n, *shape), dtype=np.uint8), labels.astype(np.int64))
    return Dataset("tiny", split, split, [str(c) for c in range(classes)])


@pytest.mark.parametrize("name", ["badnets_white", "badnets_grid", "sig", "trojan_square", "trojan_watermark"])
def test_poisoning_labels_and_images(name):
    ds = _tiny_dataset()
    art = {name: _trojan_artifact(name, ds.image_shape)} if name.startswith("trojan") else {}
    ps = poisoning.poison(ds, {name: {"ratio": 0.1, "target": 1}}, [name], seed=0, artifacts=art)
    rows = ps.manifest[ps.manifest["attack"] == name]
    assert len(rows) == 6 and (rows["target"] == 1).all()
    if name == "sig":  # clean-label: only target-class images, labels kept
        assert (rows["orig_label"] == 1).all() and (rows["label"] == 1).all()
    else:
        assert (rows["label"] == 1).all() and (rows["orig_label"] != 1).any()
    atk = poisoning._build(name, {"ratio": 0.1}, ds.image_shape, 0, art)
    np.testing.assert_array_equal(ps.images, atk.poison(ds.train.images[ps.index], ps.index))


# ---- Trojan -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["trojan_square", "trojan_watermark"])
@pytest.mark.parametrize("combine", ["add", "stamp"])
def test_trojan_apply_formula_and_mask(name, combine):
    x = _images()
    art = _trojan_artifact(name)
    atk = build_attack(name, SHAPE, 0, {"combine": combine}, art)
    m, t = art["mask"].astype(bool), art["trigger"].astype(np.float64)
    y = atk.apply(x)
    _outside_unchanged(x, y, m)
    if combine == "add":
        want = np.clip(np.rint(x + 255 * t), 0, 255)
    else:
        want = np.where(m, np.rint(255 * t), x)
    assert np.abs(y.astype(np.int64) - want).max() <= 1  # float32 rounding at .5
    assert (y[:, :, m] != x[:, :, m]).any()


def test_trojan_masks():
    sq = build_attack("trojan_square", SHAPE, 0)
    assert sq.params["size"] == 8  # 7% of the image area
    want = np.zeros((32, 32), bool)
    want[24:, 24:] = True
    np.testing.assert_array_equal(sq.mask, want)
    wm = build_attack("trojan_watermark", SHAPE, 0).mask.astype(bool)
    assert 0.1 < wm.mean() < 0.3
    np.testing.assert_array_equal(wm, wm[::-1, ::-1])  # ring and diagonal: symmetric about the centre
    assert not wm[16, 16 - 6] and wm[16, 16]  # hollow ring with the bar through the centre
    assert not wm[:3].any() and not wm[:, :3].any()


def test_trojan_needs_and_checks_artifact():
    with pytest.raises(ConfigError, match="trigger stage"):
        build_attack("trojan_square", SHAPE, 0).apply(_images())
    art = _trojan_artifact("trojan_square")
    with pytest.raises(ConfigError, match="mask"):
        build_attack("trojan_square", SHAPE, 0, {"size": 5}, art)
    with pytest.raises(ConfigError, match="trigger"):
        build_attack("trojan_square", SHAPE, 0, {}, {**art, "trigger": art["trigger"] + 2})


def _tiny_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 16 * 16, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def test_neuron_selection_and_trigger_optimisation():
    import torch

    from poisongrid.attacks.trojan import most_connected_neurons, neuron_activations, optimize_trojan_trigger

    model = _tiny_model()
    with torch.no_grad():
        model[-1].weight.copy_(torch.tensor([[0.1, -3.0, 0.2, 0.0, 1.0, 0.0]] * 3))
        model[3].bias.fill_(0.5)  # live units: a dead ReLU gives no gradient to follow
    np.testing.assert_array_equal(most_connected_neurons(model, 2), [1, 4])
    mask = build_attack("trojan_square", (3, 16, 16), 0).mask
    trig = optimize_trojan_trigger(model, mask, [1, 4], steps=12, lr=0.1)
    assert trig.shape == (3, 16, 16) and trig.dtype == np.float32 and 0 <= trig.min() and trig.max() <= 1
    assert (trig[:, ~mask.astype(bool)] == 0).all()
    rand = np.random.default_rng(0).uniform(0, 1, (3, 16, 16)).astype(np.float32) * mask

    def act(t):
        with torch.no_grad():
            return neuron_activations(model, torch.from_numpy(t)[None], [1, 4]).sum().item()

    assert act(trig) > act(rand) + 1e-3 and act(trig) > act(mask * np.ones((3, 1, 1), np.float32))
    np.testing.assert_array_equal(trig, optimize_trojan_trigger(model, mask, [1, 4], steps=12, lr=0.1))


@pytest.mark.parametrize("name", ["trojan_square", "trojan_watermark"])
def test_trojan_learn_contract(name):
    import torch

    ds = _tiny_dataset(n=48, shape=(3, 16, 16))
    cls = ATTACKS.get(name)
    settings = cls.check_learn({"model": "smallcnn", "epochs": 1, "pool_fraction": 0.5, "steps": 5}, "learn")
    training = dict(batch_size=16, lr=3e-3, weight_decay=0.0, augment="none")
    job = LearnJob(dataset=ds, target=1, seed=0, params={}, settings=settings, training=training, device=torch.device("cpu"))
    out = cls.learn(job)
    mask = build_attack(name, ds.image_shape, 0).mask
    assert set(out) == {"trigger", "mask", "neurons"} and out["neurons"].shape == (2,)
    np.testing.assert_array_equal(out["mask"], mask)
    assert out["trigger"].shape == (3, 16, 16) and out["trigger"].dtype == np.float32
    assert (out["trigger"][:, mask == 0] == 0).all()
    build_attack(name, ds.image_shape, 0, {}, out).apply(ds.test.images[:4])  # usable as the artifact


# ---- configuration errors ----------------------------------------------------------------------

@pytest.mark.parametrize("name,params,key", [
    ("badnets_white", {"size": 0}, "size"), ("badnets_white", {"size": 33}, "size"),
    ("badnets_white", {"corner": "middle"}, "corner"), ("badnets_white", {"margin": 30}, "margin"),
    ("badnets_grid", {"size": 4}, "size"), ("badnets_grid", {"pattern": "stripes"}, "pattern"),
    ("badnets_grid", {"size": 2}, "size"), ("sig", {"delta_train": 0}, "delta_train"),
    ("sig", {"delta_test": 300}, "delta_test"), ("sig", {"frequency": -1}, "frequency"),
    ("sig", {"delta": 20}, "delta"), ("trojan_square", {"combine": "blend"}, "combine"),
    ("trojan_square", {"size": 40}, "size"), ("trojan_watermark", {"radius": 0}, "radius"),
    ("trojan_watermark", {"stroke": 0.6}, "stroke"),
])
def test_bad_params(name, params, key):
    with pytest.raises(ConfigError) as e:
        build_attack(name, SHAPE, 0, params)
    assert e.value.key == f"attacks.{name}.{key}"


@pytest.mark.parametrize("settings,key", [({"pool_fraction": 1.5}, "pool_fraction"), ({"n_neurons": 0}, "n_neurons"),
                                          ({"model": "nope"}, "model"), ({"steps": 2.5}, "steps")])
def test_bad_learn_settings(settings, key):
    with pytest.raises(ConfigError) as e:
        ATTACKS.get("trojan_square").check_learn(settings, "learn")
    assert e.value.key.startswith(f"learn.{key}") or e.value.key == "learn.model"
