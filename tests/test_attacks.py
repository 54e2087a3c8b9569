"""Per-image triggers: exact formulas checked against independent computations."""
import numpy as np
import pytest
from scipy.fft import dctn, idctn

from poisongrid.attacks import ATTACKS, BLEND_TYPE, Attack, build_attack
from poisongrid.errors import ConfigError

SHAPE = (3, 32, 32)
EPS = 16 / 255


def _images(n=6, shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _trigger(shape=SHAPE, eps=EPS, seed=1):
    return np.random.default_rng(seed).uniform(-eps, eps, size=shape).astype(np.float32)


def _build(name, seed=0, shape=SHAPE, trigger=None, **params):
    artifact = None
    if name == "narcissus":
        artifact = {"trigger": _trigger(shape) if trigger is None else trigger}
    if name.startswith("trojan_"):  # a random learned trigger inside the attack's own mask
        mask = build_attack(name, shape, seed, params).mask
        artifact = {"trigger": np.random.default_rng(1).uniform(0, 1, shape).astype(np.float32) * mask, "mask": mask}
    elif name == "l2_invisible":
        artifact = {"trigger": _trigger(shape, eps=1 / 255)}  # l2 norm < 2 at 32 px
    elif name == "label_consistent":
        artifact = {"index": np.zeros(0, np.int64), "delta": np.zeros((0, *shape), np.int8)}
    elif name == "adaptive_blend":
        artifact = {"alpha": np.float64(0.1), "pattern": np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)}
    elif name == "dynamic":  # untrained nets: the contract holds for any weights
        from poisongrid.attacks.dynamic import initial_artifact

        artifact = initial_artifact(shape)
    return build_attack(name, shape, seed, params, artifact)


def _blend(x, a, p):  # p in [0,1] units
    return (1 - a) * x.astype(np.float64) + a * 255.0 * p


def _diff(a, b):
    return np.abs(a.astype(np.int64) - b.astype(np.int64))


# ---- common contract --------------------------------------------------------------------------

def test_registry_names_and_flags():
    assert ATTACKS.names() == sorted(["patch", "single_pixel", "blend_random", "blend_pattern", "sinusoid",
                                      "frequency", "narcissus", "badnets_white", "badnets_grid", "sig",
                                      "trojan_square", "trojan_watermark", "l2_invisible", "label_consistent", "dynamic",
                                      "adaptive_blend"])
    assert BLEND_TYPE == {"blend_random", "blend_pattern", "sinusoid", "narcissus", "frequency", "adaptive_blend"}
    assert {n for n in ATTACKS.names() if ATTACKS.get(n).clean_label} == {"sinusoid", "narcissus", "sig", "label_consistent"}
    assert [n for n in ATTACKS.names() if ATTACKS.get(n).learns()] == ["adaptive_blend", "dynamic", "l2_invisible", "label_consistent", "narcissus",
                                                                       "trojan_square", "trojan_watermark"]


@pytest.mark.parametrize("name", sorted(ATTACKS.names()))
@pytest.mark.parametrize("boost", [False, True])
def test_contract(name, boost):
    x = _images()
    x0 = x.copy()
    a, b = _build(name, seed=3), _build(name, seed=3)
    assert isinstance(a, Attack)
    y = a.apply(x, boost=boost)
    assert y.dtype == np.uint8 and y.shape == x.shape
    assert y is not x and not np.shares_memory(y, x)
    np.testing.assert_array_equal(x, x0)  # input untouched
    np.testing.assert_array_equal(y, b.apply(x, boost=boost))  # same seed, same bits
    assert (y != x).any()  # the trigger does something


def test_blend_random_seeds_differ_and_pattern_is_reused():
    x = _images()
    a, b = _build("blend_random", seed=1), _build("blend_random", seed=2)
    assert not np.array_equal(a.apply(x), b.apply(x))
    # the pattern is drawn once: the same image triggered twice in a batch gives the same result
    y = a.apply(np.concatenate([x[:1], x[:1]]))
    np.testing.assert_array_equal(y[0], y[1])


def test_apply_rejects_wrong_images():
    atk = _build("patch")
    with pytest.raises(ValueError):
        atk.apply(_images().astype(np.float32))
    with pytest.raises(ValueError):
        atk.apply(_images(shape=(3, 16, 16)))


# ---- patch / single pixel ---------------------------------------------------------------------

def _only_white_at(x, y, mask):
    assert (y[:, :, mask] == 255).all()
    np.testing.assert_array_equal(y[:, :, ~mask], x[:, :, ~mask])


def test_patch_32px():
    x = _images()
    mask = np.zeros((32, 32), bool)
    for r, c in [(30, 30), (28, 30), (30, 28), (29, 29)]:
        mask[r, c] = True
    _only_white_at(x, _build("patch").apply(x), mask)


def test_single_pixel_32px():
    x = _images()
    mask = np.zeros((32, 32), bool)
    mask[30, 30] = True
    _only_white_at(x, _build("single_pixel").apply(x), mask)


def test_patch_224px_scaled_blocks():
    shape = (3, 224, 224)
    x = _images(2, shape)
    atk = _build("patch", shape=shape)
    assert atk.params["scale"] == 8
    bottom = np.zeros((224, 224), bool)
    for r, c in [(208, 208), (192, 208), (208, 192), (200, 200)]:  # H - d*8 for d = 2, 4, 3
        bottom[r:r + 8, c:c + 8] = True
    _only_white_at(x, atk.apply(x), bottom)
    # top_left reproduces the reference's 224-px placement exactly
    top = np.zeros((224, 224), bool)
    for rs, cs in [((8, 16), (8, 16)), ((24, 32), (8, 16)), ((8, 16), (24, 32)), ((16, 24), (16, 24))]:
        top[slice(*rs), slice(*cs)] = True
    _only_white_at(x, _build("patch", shape=shape, corner="top_left").apply(x), top)


def test_single_pixel_224px():
    shape = (3, 224, 224)
    x = _images(2, shape)
    mask = np.zeros((224, 224), bool)
    mask[208:216, 208:216] = True
    _only_white_at(x, _build("single_pixel", shape=shape).apply(x), mask)


def test_boost_ignored_when_not_boostable():
    x = _images()
    atk = _build("patch")
    np.testing.assert_array_equal(atk.apply(x), atk.apply(x, boost=True))


# ---- blends ------------------------------------------------------------------------------------

def test_blend_random_formula():
    x = _images()
    atk = _build("blend_random", seed=7)
    p = np.random.default_rng(7).integers(0, 256, size=SHAPE) / 255
    assert _diff(atk.apply(x), np.rint(_blend(x, 0.075, p))).max() <= 1
    assert _diff(atk.apply(x, boost=True), np.rint(_blend(x, 0.15, p))).max() <= 1
    atk = _build("blend_random", seed=7, alpha=0.3)
    assert _diff(atk.apply(x), np.rint(_blend(x, 0.3, p))).max() <= 1


def test_blend_pattern_formula_and_direction():
    x = np.full((2, *SHAPE), 128, np.uint8)
    x[1] = _images(1)[0]
    p = np.zeros(SHAPE)
    p[:, ::2, ::2] = 1
    atk = _build("blend_pattern", alpha=0.1)
    y = atk.apply(x)
    assert _diff(y, np.rint(_blend(x, 0.1, p))).max() <= 1
    assert _diff(atk.apply(x, boost=True), np.rint(_blend(x, 0.2, p))).max() <= 1
    on = p.astype(bool)
    assert (y[0][on] > 128).all() and (y[0][~on] < 128).all()  # dots toward white, rest toward black
    d = y.astype(int) - x
    assert (d[:, on] >= 0).all() and (d[:, ~on] <= 0).all()


def test_sinusoid_formula_and_columns():
    x = _images()
    col = 1 - np.cos(2 * np.pi * np.arange(32) * 6 / 32)
    p = np.broadcast_to(col, SHAPE)
    atk = _build("sinusoid")
    y = atk.apply(x)
    assert _diff(y, np.clip(np.rint(_blend(x, 0.075, p)), 0, 255)).max() <= 1
    assert _diff(atk.apply(x, boost=True), np.clip(np.rint(_blend(x, 0.15, p)), 0, 255)).max() <= 1
    flat = np.isclose(col, 0)  # col 0 (and every W/6-th): only the (1 - a) x shrink applies
    assert flat[0]
    assert _diff(y[..., flat], np.rint(0.925 * x[..., flat].astype(float))).max() <= 1
    peak = np.argmax(col)
    assert (y[..., peak].astype(int) >= x[..., peak]).all()


# ---- frequency ---------------------------------------------------------------------------------

def _ycrcb(x):  # OpenCV's float RGB -> YCrCb, written out independently
    r, g, b = x.astype(np.float64).transpose(1, 0, 2, 3)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return np.stack([y, (r - y) * 0.713 + 128, (b - y) * 0.564 + 128], axis=1)


def _block_dct(ch, b=32):  # (N, H, W) -> (N, H//b, W//b, b, b) orthonormal DCT of every tile
    n, h, w = ch.shape
    t = ch[:, :h // b * b, :w // b * b].reshape(n, h // b, b, w // b, b).transpose(0, 1, 3, 2, 4)
    return dctn(t, axes=(-2, -1), norm="ortho")


def _freq_reference(x, mag, b=32, pos=((15, 15), (31, 31))):
    """The FTrojan steps in float, run per image: YCrCb, block DCT, add, inverse, RGB, clip."""
    ycc = _ycrcb(x)
    n, _, h, w = x.shape
    for ch in (1, 2):
        for i in range(0, h - h % b, b):
            for j in range(0, w - w % b, b):
                c = dctn(ycc[:, ch, i:i + b, j:j + b], axes=(-2, -1), norm="ortho")
                for r, q in pos:
                    c[:, r, q] += mag
                ycc[:, ch, i:i + b, j:j + b] = idctn(c, axes=(-2, -1), norm="ortho")
    y, cr, cb = ycc[:, 0], ycc[:, 1] - 128, ycc[:, 2] - 128
    r = y + cr / 0.713
    bl = y + cb / 0.564
    g = (y - 0.299 * r - 0.114 * bl) / 0.587
    return np.clip(np.rint(np.stack([r, g, bl], axis=1)), 0, 255)


def test_frequency_magnitude_zero_is_identity():
    x = _images()
    assert _diff(_build("frequency", magnitude=0).apply(x), x).max() <= 1


def test_frequency_matches_stepwise_pipeline():
    x = _images(3, (3, 64, 64))  # 2x2 tiles
    atk = _build("frequency", shape=(3, 64, 64))
    assert _diff(atk.apply(x), _freq_reference(x, 30)).max() <= 1
    assert _diff(atk.apply(x, boost=True), _freq_reference(x, 60)).max() <= 1


@pytest.mark.parametrize("boost,mag", [(False, 30), (True, 60)])
def test_frequency_energy_at_positions(boost, mag):
    x = np.random.default_rng(0).integers(40, 216, size=(4, 3, 64, 64), dtype=np.uint8)  # no clipping
    y = _build("frequency", shape=(3, 64, 64)).apply(x, boost=boost)
    d = _ycrcb(y) - _ycrcb(x)
    assert np.abs(d[:, 0]).max() < 1.5  # luma barely moves (rounding only)
    for ch in (1, 2):
        c = _block_dct(d[:, ch])  # (N, 2, 2, 32, 32)
        on = np.zeros((32, 32), bool)
        on[15, 15] = on[31, 31] = True
        # uint8 rounding of a ~6-level pattern shifts coefficients by up to ~2.5, no more
        np.testing.assert_allclose(c[..., on], mag, atol=3)
        assert np.abs(c[..., ~on]).max() < 4
        assert (c[..., ~on] ** 2).sum() < 0.05 * (c[..., on] ** 2).sum()


def test_frequency_clips_instead_of_wrapping():
    white = np.full((1, *SHAPE), 255, np.uint8)
    black = np.zeros((1, *SHAPE), np.uint8)
    atk = _build("frequency")
    for boost in (False, True):
        assert atk.apply(white, boost=boost).min() > 200  # would wrap to ~0 without clipping
        assert atk.apply(black, boost=boost).max() < 55  # would wrap to ~255 without clipping


def test_frequency_partial_tiles_and_small_images():
    x = _images(2, (3, 40, 40))
    y = _build("frequency", shape=(3, 40, 40)).apply(x)
    np.testing.assert_array_equal(y[:, :, 32:], x[:, :, 32:])  # remainder left unchanged
    np.testing.assert_array_equal(y[:, :, :, 32:], x[:, :, :, 32:])
    atk = _build("frequency", shape=(3, 8, 8))
    assert atk.params["block"] == 8 and atk.params["positions"] == [[3, 3], [7, 7]]
    with pytest.raises(ConfigError):
        _build("frequency", block=64)
    with pytest.raises(ConfigError):
        _build("frequency", block=16, positions=[[16, 0]])


# ---- narcissus ---------------------------------------------------------------------------------

def test_narcissus_apply_and_boost():
    x = _images()
    t = _trigger()
    atk = _build("narcissus", trigger=t)
    for k, boost in ((1, False), (2, True)):
        y = atk.apply(x, boost=boost)
        want = np.clip(np.rint(x + k * 255.0 * t), 0, 255)
        assert _diff(y, want).max() <= 1
        inside = (want > 0) & (want < 255)
        assert (_diff(y, x)[inside] <= k * EPS * 255 + 0.5).all()


def test_narcissus_trigger_required_and_checked():
    # Without what it learns the attack checks its parameters but cannot be applied.
    with pytest.raises(ConfigError, match="trigger stage"):
        build_attack("narcissus", SHAPE, 0).apply(_images())
    with pytest.raises(ConfigError, match="shape"):
        _build("narcissus", trigger=np.zeros((3, 16, 16), np.float32))
    with pytest.raises(ConfigError, match="eps"):
        _build("narcissus", trigger=np.full(SHAPE, 0.2, np.float32))


def _tiny_surrogate():
    import torch

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 16 * 16, 5))
    with torch.no_grad():
        m[-1].weight.mul_(10)  # sharper logits, like a trained model's
    return m


def test_optimize_trigger_lowers_loss_and_is_deterministic():
    import torch
    import torch.nn.functional as F

    from poisongrid.attacks.narcissus import optimize_trigger

    model = _tiny_surrogate()
    model.train()
    imgs = _images(40, (3, 16, 16))
    target = 3
    kw = dict(eps=EPS, rounds=17, lr=0.01, batch_size=16, seed=5)  # 3 batches a round
    t1 = optimize_trigger(model, imgs, target, **kw)
    t2 = optimize_trigger(model, imgs, target, **kw)
    t_plain = optimize_trigger(model, imgs, target, **kw, augment=False)
    assert t1.dtype == np.float32 and t1.shape == (3, 16, 16)
    for t in (t1, t_plain):
        assert np.abs(t).max() <= EPS + 1e-6 and np.abs(t).max() > EPS / 2
    np.testing.assert_array_equal(t1, t2)
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored

    model.eval()
    x = torch.from_numpy(imgs).float() / 255
    y = torch.full((len(imgs),), target)

    def loss(t):
        with torch.no_grad():
            return F.cross_entropy(model((x + torch.from_numpy(np.asarray(t, np.float32))).clamp(0, 1)), y).item()

    rand = np.random.default_rng(1).choice([-EPS, EPS], size=(3, 16, 16))
    before = loss(np.zeros((3, 16, 16)))
    assert loss(t1) < min(before - 0.1, loss(rand))  # better than no trigger and than random noise
    assert loss(t_plain) < before - 0.5  # without augmentation the surrogate is fooled outright
    # the trigger is usable by the attack as-is
    _build("narcissus", shape=(3, 16, 16), trigger=t1).apply(imgs)


def test_optimize_trigger_logs_its_rounds():
    import re

    from poisongrid.attacks.narcissus import optimize_trigger

    model = _tiny_surrogate()
    imgs = _images(20, (3, 16, 16))
    msgs = []
    kw = dict(eps=EPS, rounds=25, lr=0.01, batch_size=8, seed=5)
    logged = optimize_trigger(model, imgs, 3, **kw, log=msgs.append)
    assert [int(re.match(r"narcissus round (\d+)/25 loss [\d.]+ elapsed [\d.hms]+$", m).group(1)) for m in msgs] == \
        [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25]
    np.testing.assert_array_equal(logged, optimize_trigger(model, imgs, 3, **kw))  # logging changes nothing


# ---- configuration errors ------------------------------------------------------------------------

def test_unknown_attack_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        build_attack("wanet", SHAPE, 0)
    for n in ATTACKS.names():
        assert n in str(e.value)


def test_unknown_param():
    with pytest.raises(ConfigError) as e:
        build_attack("blend_random", SHAPE, 0, {"alpah": 0.1})
    assert e.value.key == "attacks.blend_random.alpah" and "alpha" in e.value.allowed


@pytest.mark.parametrize("name,params", [
    ("blend_random", {"alpha": 0}), ("blend_pattern", {"alpha": 1.5}), ("sinusoid", {"alpha": -0.1}),
    ("blend_random", {"alpha": "0.1"}), ("sinusoid", {"cycles": 0}), ("frequency", {"magnitude": -1}),
    ("patch", {"scale": 0}), ("patch", {"scale": 9}), ("single_pixel", {"scale": 1.5}),
    ("patch", {"corner": "middle"}), ("narcissus", {"eps": 0}),
])
def test_out_of_range_params(name, params):
    with pytest.raises(ConfigError) as e:
        _build(name, **params)
    assert e.value.key == f"attacks.{name}.{next(iter(params))}"


def test_learned_attacks_note_budgets_below_their_references():
    """The paper preset learns at the references' budgets (no note); the digits presets run short
    ones, which the poisoned set records and the tables mark."""
    import yaml

    from poisongrid import config
    from poisongrid.attacks import ATTACKS

    lc = ATTACKS.get("label_consistent")
    assert lc.budget_note({**lc.learn_defaults, **lc.reference_learn}) is None
    note = lc.budget_note({**lc.learn_defaults, "adversarial": False})
    assert note.startswith("learned with epochs 20 (reference 205), pool_fraction 0.25 (reference 1), adversarial off")
    for preset, short in (("configs/lfd-paper.yaml", False), ("configs/lfd-attacks-digits.yaml", True)):
        cfg = config.validate(yaml.safe_load(open(preset)), deep=False)
        for ds in cfg["datasets"].values():
            for name, a in ds["attacks"].items():
                cls = ATTACKS.get(name)
                if cls.reference_learn:
                    assert (cls.budget_note(a["learn"]) is not None) == short, (preset, name)
