import io

import numpy as np
import pytest
import torch

from poisongrid import poisoning
from poisongrid.attacks import build_attack
from poisongrid.attacks.base import LearnJob
from poisongrid.attacks.dynamic import Dynamic
from poisongrid.data import Dataset, Split
from poisongrid.errors import ConfigError

SHAPE = (3, 16, 16)
LEARN = {"epochs": 1, "mask_epochs": 2, "width": 4, "depth": 2, "model": "smallcnn"}


def _dataset(n=96, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    split = lambda k: Split(rng.integers(0, 256, (k, *SHAPE), dtype=np.uint8), rng.integers(0, classes, k).astype(np.int64))
    return Dataset("synthetic", split(n), split(32), [str(i) for i in range(classes)])


def _learn(ds, seed=0, **settings):
    job = LearnJob(dataset=ds, target=1, seed=seed, params={}, settings={**LEARN, **settings},
                   training={"batch_size": 16}, device=torch.device("cpu"))
    return Dynamic.learn(job)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These nets are tiny: threads only add overhead (tens of times slower on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ds():
    return _dataset()


@pytest.fixture(scope="module")
def artifact(ds):
    return _learn(ds)


def _attack(artifact, seed=0):
    return build_attack("dynamic", SHAPE, seed, {}, artifact)


def test_artifact_layout(artifact):
    assert int(artifact["arch_width"]) == 4 and int(artifact["arch_depth"]) == 2
    assert artifact["arch_width"].dtype.kind == "i" and artifact["arch_depth"].dtype.kind == "i"
    assert any(k.startswith("gen.") for k in artifact) and any(k.startswith("mask.") for k in artifact)
    assert artifact["mask.up.1.1.0.weight"].shape[0] == 1  # one mask channel
    assert artifact["gen.up.1.1.0.weight"].shape[0] == 3  # a pattern per colour channel
    assert {"helper_clean_accuracy", "helper_asr", "mask_mean"} <= set(artifact)


def test_learning_is_deterministic(ds, artifact):
    again = _learn(ds)
    assert set(again) == set(artifact)
    for k in artifact:
        np.testing.assert_array_equal(again[k], artifact[k])


def test_apply_is_the_masked_mix_and_input_aware(ds, artifact):
    atk = _attack(artifact)
    x = ds.test.images[:8]
    pattern, m = atk.triggers(x)
    assert pattern.shape == x.shape and m.shape == (8, 1, 16, 16)
    assert pattern.min() >= 0 and pattern.max() <= 1 and m.min() >= 0 and m.max() <= 1
    out = atk.apply(x)
    xf = x.astype(np.float32)
    np.testing.assert_array_equal(out, np.clip(np.rint(xf * (1 - m) + pattern * 255 * m), 0, 255).astype(np.uint8))
    # Different images get different patterns and masks.
    assert not np.allclose(pattern[0], pattern[1]) and not np.array_equal(m[0], m[1])
    # The same image gets the same trigger bit for bit, whatever its batch, and from a rebuilt attack.
    np.testing.assert_array_equal(out[3:4], atk.apply(x[3:4]))
    np.testing.assert_array_equal(out, _attack(artifact, seed=5).apply(x))
    p2, m2 = atk.triggers(x[::-1])
    np.testing.assert_array_equal(p2[::-1], pattern)
    np.testing.assert_array_equal(m2[::-1], m)
    assert not np.array_equal(out, x)


def _constant_mask(artifact, value):
    """The mask network's last BatchNorm made constant: its pre-squash output is `value` everywhere."""
    a = dict(artifact)
    a["mask.up.1.1.1.weight"] = np.zeros_like(a["mask.up.1.1.1.weight"])
    a["mask.up.1.1.1.bias"] = np.full_like(a["mask.up.1.1.1.bias"], value)
    return a


def test_pixels_outside_the_mask_are_unchanged(ds, artifact):
    x = ds.test.images[:6]
    off = _attack(_constant_mask(artifact, -20.0))
    _, m = off.triggers(x)
    assert m.max() < 1e-6
    np.testing.assert_array_equal(off.apply(x), x)
    on = _attack(_constant_mask(artifact, 20.0))
    pattern, m = on.triggers(x)
    assert m.min() > 1 - 1e-6
    np.testing.assert_array_equal(on.apply(x), np.clip(np.rint(pattern * 255), 0, 255).astype(np.uint8))
    # Learned masks: wherever m * 255 is far below half a grey level, the pixel keeps its value.
    atk = _attack(artifact)
    _, m = atk.triggers(x)
    out = atk.apply(x)
    small = np.broadcast_to(m < 1e-3, x.shape)
    np.testing.assert_array_equal(out[small], x[small])


def test_poison_flips_labels_to_the_target(ds, artifact):
    cfg = {"dynamic": {"ratio": 0.25}}
    ps = poisoning.poison(ds, cfg, ["dynamic"], seed=0, artifacts={"dynamic": artifact})
    m = ps.manifest
    rows = m[m["attack"] == "dynamic"]
    t = ps.meta["attacks"]["dynamic"]["target"]
    assert len(rows) == 24 and (rows["label"] == t).all() and not ps.meta["attacks"]["dynamic"]["clean_label"]
    clean = m["attack"].isna().to_numpy()
    assert (m["label"][clean] == m["orig_label"][clean]).all()
    np.testing.assert_array_equal(ps.images, _attack(artifact).apply(ds.train.images[ps.index]))
    again = poisoning.poison(ds, cfg, ["dynamic"], seed=0, artifacts={"dynamic": artifact})
    np.testing.assert_array_equal(again.images, ps.images)


def test_artifact_round_trips_through_npz(ds, artifact):
    buf = io.BytesIO()
    np.savez(buf, **artifact)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as z:
        loaded = {k: z[k] for k in z.files}
    x = ds.test.images[:5]
    np.testing.assert_array_equal(_attack(loaded).apply(x), _attack(artifact).apply(x))


def test_without_artifact_validates_but_cannot_apply(ds):
    atk = build_attack("dynamic", SHAPE, 0, {})
    with pytest.raises(ConfigError, match="dynamic"):
        atk.apply(ds.test.images[:2])
    with pytest.raises(ConfigError, match="dynamic"):
        atk.poison(ds.train.images[:2], np.arange(2))
    with pytest.raises(ConfigError, match="attacks.dynamic.alpha"):
        build_attack("dynamic", SHAPE, 0, {"alpha": 0.1})


@pytest.mark.parametrize("settings, key", [
    ({"p_attack": 1.5}, "p_attack"), ({"p_attack": 0.6, "p_cross": 0.5}, "p_cross"), ({"mask_density": 1.0}, "mask_density"),
    ({"width": 2.5}, "width"), ({"epochs": 0}, "epochs"), ({"lambda_norm": -1}, "lambda_norm"), ({"depth": 6}, "depth"),
    ({"model": "nope"}, "model"), ({"model": 3}, "model"), ({"bogus": 1}, "bogus"),
])
def test_bad_learn_settings(settings, key):
    with pytest.raises(ConfigError, match=key):
        Dynamic.check_learn(settings, "attacks.dynamic.learn")


def test_bad_artifacts(artifact):
    bad = dict(artifact)
    bad["arch_width"] = np.int64(5)  # the weights no longer fit the architecture
    with pytest.raises(ConfigError, match="gen"):
        _attack(bad)
    bad = dict(artifact)
    bad["arch_depth"] = np.float64(2.0)
    with pytest.raises(ConfigError, match="arch_depth"):
        _attack(bad)
    bad = {k: v for k, v in artifact.items() if k != "mask.down.0.0.0.weight"}
    with pytest.raises(ConfigError, match="mask"):
        _attack(bad)
    bad = {**artifact, "gen.extra": np.zeros(1)}
    with pytest.raises(ConfigError, match="gen"):
        _attack(bad)


def test_any_image_size_and_grey_images():
    shape = (1, 13, 11)  # odd sizes survive the pooling and upsampling
    rng = np.random.default_rng(1)
    mk = lambda k: Split(rng.integers(0, 256, (k, *shape), dtype=np.uint8), rng.integers(0, 3, k).astype(np.int64))
    ds = Dataset("odd", mk(32), mk(8), ["a", "b", "c"])
    a = _learn(ds, epochs=1, mask_epochs=1, width=2)
    out = build_attack("dynamic", shape, 0, {}, a).apply(ds.test.images)
    assert out.shape == ds.test.images.shape and out.dtype == np.uint8
