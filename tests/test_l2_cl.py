"""l2-invisible (Li et al. 2020) and label-consistent (Turner et al. 2019): learned triggers."""
import numpy as np
import pytest

from poisongrid import poisoning
from poisongrid.attacks import ATTACKS, build_attack
from poisongrid.attacks.base import LearnJob
from poisongrid.attacks.l2_invisible import project_l2, quantize
from poisongrid.data import Dataset, Split
from poisongrid.errors import ArtifactError, ConfigError

SHAPE = (3, 16, 16)
TRAIN = {"batch_size": 32, "optimizer": "adamw", "lr": 0.003, "weight_decay": 1e-4, "augment": "none"}


def _images(n=6, shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _dataset(n=96, classes=4, seed=0):
    """A tiny learnable synthetic set: each class a different mean brightness per channel."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    base = np.array([[60, 60, 60], [190, 60, 60], [60, 190, 60], [60, 60, 190]], dtype=np.float64)[labels % 4]
    imgs = np.clip(base[:, :, None, None] + rng.normal(0, 25, size=(n, *SHAPE)), 0, 255).astype(np.uint8)
    split = Split(imgs, labels.astype(np.int64))
    return Dataset("tiny", split, Split(imgs[:8], labels[:8].astype(np.int64)), [f"c{i}" for i in range(classes)])


def _job(ds, target, params, settings, seed=0):
    import torch

    name = "label_consistent" if "eps" in settings else "l2_invisible"
    s = ATTACKS.get(name).check_learn(settings, f"attacks.{name}.learn")
    return LearnJob(dataset=ds, target=target, seed=seed, params=params, settings=s, training=TRAIN,
                    device=torch.device("cpu"))


def _l2(a, b):  # per image, [0,1] units
    return np.sqrt(((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).sum(1)) / 255


# ---- l2_invisible --------------------------------------------------------------------------------

def test_projection_is_exact_and_quantisation_never_grows():
    t = np.random.default_rng(0).normal(0, 1, SHAPE)
    p = project_l2(t, 2.0)
    assert np.linalg.norm(p) == pytest.approx(2.0, rel=1e-12)
    np.testing.assert_allclose(p / np.linalg.norm(p), t / np.linalg.norm(t))  # same direction
    small = t * (1.5 / np.linalg.norm(t))
    np.testing.assert_array_equal(project_l2(small, 2.0), small)  # inside the ball: untouched
    q = quantize(p)
    k = q.astype(np.float64) * 255
    np.testing.assert_allclose(k, np.rint(k), atol=1e-4)  # whole pixel steps
    assert (np.abs(np.rint(k)) <= np.abs(p * 255) + 1e-9).all() and np.linalg.norm(q) <= 2.0


def _l2_trigger(bound=2.0, seed=0):
    return quantize(project_l2(np.random.default_rng(seed).normal(0, 1, SHAPE), bound))


def test_l2_apply_formula_everywhere_and_within_bound():
    t = _l2_trigger()
    atk = build_attack("l2_invisible", SHAPE, 0, {"l2_bound": 2.0}, {"trigger": t})
    x = _images(20)
    y = atk.apply(x)
    k = np.rint(t.astype(np.float64) * 255)
    np.testing.assert_array_equal(y, np.clip(x + k, 0, 255).astype(np.uint8))
    assert (k != 0).mean() > 0.9  # an image-sized trigger, not a patch
    assert (_l2(y, x) <= 2.0 + 1e-9).all() and _l2(y, x).max() > 1.5


def test_l2_flips_labels_via_poisoning():
    ds = _dataset()
    cfg = {"l2_invisible": {"ratio": 0.25, "target": 1, "l2_bound": 2.0}}
    ps = poisoning.poison(ds, cfg, ["l2_invisible"], seed=0,
                          artifacts={"l2_invisible": {"trigger": _l2_trigger()}})
    m = ps.manifest
    rows = m[m["attack"] == "l2_invisible"]
    assert len(rows) == 24 and (rows["label"] == 1).all() and (rows["orig_label"] != 1).any()
    assert (m["label"][m["attack"].isna()] == m["orig_label"][m["attack"].isna()]).all()
    k = np.rint(_l2_trigger().astype(np.float64) * 255)
    np.testing.assert_array_equal(ps.images, np.clip(ds.train.images[ps.index] + k, 0, 255).astype(np.uint8))


def test_l2_checks_bound_and_needs_its_trigger():
    t = _l2_trigger(2.0)
    with pytest.raises(ConfigError, match="l2_bound"):
        build_attack("l2_invisible", SHAPE, 0, {"l2_bound": 1.0}, {"trigger": t})
    with pytest.raises(ConfigError):
        build_attack("l2_invisible", SHAPE, 0, {}, {"trigger": t[:, :8]})
    atk = build_attack("l2_invisible", SHAPE, 0, {"l2_bound": 1.0})  # config check: no artifact needed
    with pytest.raises(ConfigError):
        atk.apply(_images())
    with pytest.raises(ConfigError):
        atk.poison(_images(), np.arange(6))
    for bad in (0, -1.0, "2", 1e6, float("nan")):
        with pytest.raises(ConfigError) as e:
            build_attack("l2_invisible", SHAPE, 0, {"l2_bound": bad})
        assert e.value.key == "attacks.l2_invisible.l2_bound"


def test_optimize_l2_trigger_raises_the_chosen_activation():
    import torch

    from poisongrid.attacks.l2_invisible import optimize_l2_trigger

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(SHAPE)), 6), torch.nn.ReLU(),
                                torch.nn.Linear(6, 4))
    model.train()
    x = _images(16)
    kw = dict(bound=1.0, steps=15, lr=0.05, reg=0.01, neurons=2, batch_size=8, seed=3)
    t = optimize_l2_trigger(model, x, **kw)
    np.testing.assert_array_equal(t, optimize_l2_trigger(model, x, **kw))
    assert t.dtype == np.float32 and t.shape == SHAPE and 0.9 < np.linalg.norm(t.astype(np.float64)) <= 1.0
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored
    chosen = torch.topk(model[-1].weight.abs().sum(0), 2).indices
    xt = torch.from_numpy(x).float() / 255

    def act(d):
        with torch.no_grad():
            return model[:3]((xt + torch.from_numpy(d)).clamp(0, 1))[:, chosen].mean().item()

    rand = project_l2(np.random.default_rng(1).normal(0, 1, SHAPE).astype(np.float32), 1.0)
    assert act(t) > max(act(np.zeros(SHAPE, np.float32)), act(rand)) + 0.05


@pytest.mark.slow
def test_l2_learn_contract():
    ds = _dataset()
    settings = {"model": "smallcnn", "epochs": 1, "pool_fraction": 0.5, "steps": 10, "lr": 0.05}
    out = ATTACKS.get("l2_invisible").learn(_job(ds, 1, {"l2_bound": 1.5}, settings))
    again = ATTACKS.get("l2_invisible").learn(_job(ds, 1, {"l2_bound": 1.5}, settings))
    t = out["trigger"]
    assert set(out) == {"trigger"} and t.dtype == np.float32 and t.shape == SHAPE
    np.testing.assert_array_equal(t, again["trigger"])  # deterministic from the seed
    assert 1.0 < np.linalg.norm(t.astype(np.float64)) <= 1.5
    build_attack("l2_invisible", SHAPE, 0, {"l2_bound": 1.5}, out).apply(_images())
    with pytest.raises(ConfigError):
        ATTACKS.get("l2_invisible").check_learn({"pool_fraction": 2.0}, "k")


# ---- label_consistent ----------------------------------------------------------------------------

# The reference's trigger, (row, col) offsets and signs, written out independently of the module.
_REF_BR = [((-1, -1), 1), ((-1, -2), -1), ((-1, -3), 1), ((-2, -1), -1), ((-2, -2), 1), ((-2, -3), -1),
           ((-3, -1), 1), ((-3, -2), -1), ((-3, -3), -1)]
_REF_OTHER = [((0, 0), 1), ((0, 1), -1), ((0, 2), -1), ((1, 0), -1), ((1, 1), 1), ((1, 2), -1), ((2, 0), 1),
              ((2, 1), -1), ((2, 2), 1), ((-1, 0), 1), ((-1, 1), -1), ((-1, 2), 1), ((-2, 0), -1), ((-2, 1), 1),
              ((-2, 2), -1), ((-3, 0), 1), ((-3, 1), -1), ((-3, 2), -1), ((0, -1), 1), ((0, -2), -1), ((0, -3), -1),
              ((1, -1), -1), ((1, -2), 1), ((1, -3), -1), ((2, -1), 1), ((2, -2), -1), ((2, -3), 1)]


def _ref_stamp(x, corners, amplitude):
    y = x.astype(np.float64)
    for (r, c), v in _REF_BR + (_REF_OTHER if corners == 4 else []):
        y[:, :, r, c] += v * amplitude
    return np.clip(y, 0, 255).astype(np.uint8)


def _cl_artifact(ds, target=1, seed=0):
    index = np.flatnonzero(ds.train.labels == target).astype(np.int64)
    delta = np.random.default_rng(seed).integers(-8, 9, size=(len(index), *SHAPE)).astype(np.int8)
    return {"index": index, "delta": delta}


@pytest.mark.parametrize("corners,amplitude", [(1, 255), (4, 255), (1, 16), (4, 64)])
def test_cl_test_trigger_is_the_reference_pattern(corners, amplitude):
    x = _images(10)
    atk = build_attack("label_consistent", SHAPE, 0, {"corners": corners, "amplitude": amplitude},
                       _cl_artifact(_dataset()))
    y = atk.apply(x)
    np.testing.assert_array_equal(y, _ref_stamp(x, corners, amplitude))  # trigger only, no perturbation
    region = np.zeros(SHAPE[1:], bool)
    region[-3:, -3:] = True
    if corners == 4:
        region[:3, :3] = region[:3, -3:] = region[-3:, :3] = True
    np.testing.assert_array_equal(y[:, :, ~region], x[:, :, ~region])


def test_cl_poison_keeps_labels_and_adds_delta_then_trigger():
    ds = _dataset()
    art = _cl_artifact(ds)
    cfg = {"label_consistent": {"ratio": 0.2, "target": 1, "corners": 4, "amplitude": 32}}
    ps = poisoning.poison(ds, cfg, ["label_consistent"], seed=0, artifacts={"label_consistent": art})
    m = ps.manifest
    rows = m[m["attack"] == "label_consistent"]
    assert len(rows) == 19 and (rows["orig_label"] == 1).all() and (rows["label"] == 1).all()
    assert (m["label"] == m["orig_label"]).all()
    assert set(ps.index) <= set(art["index"])  # only target-class images change
    d = art["delta"][np.searchsorted(art["index"], ps.index)]
    perturbed = np.clip(ds.train.images[ps.index].astype(np.int64) + d, 0, 255)
    np.testing.assert_array_equal(ps.images, _ref_stamp(perturbed, 4, 32))


def test_cl_poison_needs_a_delta_for_each_row_and_its_artifact():
    ds = _dataset()
    atk = build_attack("label_consistent", SHAPE, 0, {}, _cl_artifact(ds))
    with pytest.raises(ArtifactError, match="no adversarial perturbation"):
        atk.poison(ds.train.images[:2], np.array([0, 1]))  # row 0 is class 0
    bare = build_attack("label_consistent", SHAPE, 0, {"corners": 4, "amplitude": 16})
    with pytest.raises(ConfigError):
        bare.apply(_images())
    with pytest.raises(ConfigError):
        bare.poison(ds.train.images[1:2], np.array([1]))


@pytest.mark.parametrize("params", [{"corners": 2}, {"corners": True}, {"amplitude": 0}, {"amplitude": 300},
                                    {"amplitude": "16"}])
def test_cl_bad_params(params):
    with pytest.raises(ConfigError) as e:
        build_attack("label_consistent", SHAPE, 0, params)
    assert e.value.key == f"attacks.label_consistent.{next(iter(params))}"


def test_cl_bad_artifact_and_learn_settings():
    ds = _dataset()
    art = _cl_artifact(ds)
    with pytest.raises(ConfigError):
        build_attack("label_consistent", SHAPE, 0, {}, {**art, "delta": art["delta"].astype(np.int16)})
    with pytest.raises(ConfigError):
        build_attack("label_consistent", SHAPE, 0, {}, {**art, "index": art["index"][::-1].copy()})
    cls = ATTACKS.get("label_consistent")
    for bad in ({"eps": 0.9}, {"eps": 0}, {"steps": 0}, {"adversarial": 1}, {"pool_fraction": 1.5}):
        with pytest.raises(ConfigError):
            cls.check_learn(bad, "k")


def test_pgd_respects_eps_and_raises_loss():
    import torch
    import torch.nn.functional as F

    from poisongrid.attacks.label_consistent import pgd_perturb

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(SHAPE)), 4))
    x = _images(12)
    y = np.arange(12) % 4
    d = pgd_perturb(model, x, y, eps=8 / 255, steps=10, step_size=2 / 255, batch_size=5)
    assert d.dtype == np.int8 and d.shape == x.shape and np.abs(d).max() == 8
    adv = x.astype(np.int64) + d
    assert adv.min() >= 0 and adv.max() <= 255
    xt = torch.from_numpy(x).float() / 255
    at = torch.from_numpy(adv).float() / 255
    yt = torch.from_numpy(y)
    with torch.no_grad():
        assert F.cross_entropy(model(at), yt) > F.cross_entropy(model(xt), yt) + 0.1


def test_cl_learn_contract():
    ds = _dataset()
    settings = {"model": "smallcnn", "epochs": 1, "pool_fraction": 0.5, "adv_steps": 2, "eps": 8 / 255,
                "steps": 5, "step_size": 2 / 255}
    out = ATTACKS.get("label_consistent").learn(_job(ds, 2, {}, settings))
    assert set(out) == {"index", "delta"}
    np.testing.assert_array_equal(out["index"], np.flatnonzero(ds.train.labels == 2))
    assert out["index"].dtype == np.int64 and out["delta"].dtype == np.int8
    assert out["delta"].shape == (24, *SHAPE) and 0 < np.abs(out["delta"]).max() <= 8
    # rounded adversarial images: clean + delta stays in range
    adv = ds.train.images[out["index"]].astype(np.int64) + out["delta"]
    assert adv.min() >= 0 and adv.max() <= 255
    atk = build_attack("label_consistent", SHAPE, 0, {}, out)
    got = atk.poison(ds.train.images[out["index"][:3]], out["index"][:3])
    np.testing.assert_array_equal(got, _ref_stamp(adv[:3], 1, 255))
    cost = ATTACKS.get("label_consistent").learn_epochs(ATTACKS.get("label_consistent").check_learn(settings, "k"))
    assert cost == pytest.approx(1 * 0.5 * 4 + 0.5)
