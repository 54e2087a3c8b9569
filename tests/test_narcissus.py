"""Narcissus's trigger stage: rounds over the target class, the poison warm-up, the attacker's pool."""
import numpy as np
import pytest
from PIL import Image

from poisongrid.attacks import ATTACKS
from poisongrid.attacks.base import LearnJob
from poisongrid.attacks.narcissus import Narcissus, load_pool, optimize_trigger
from poisongrid.data import Dataset, Split
from poisongrid.errors import ConfigError

EPS = 16 / 255
KEY = "datasets.d.attacks.narcissus.learn"


def _images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)


def _dataset(per_class=10, classes=3, size=16):
    x = _images(per_class * classes, size)
    y = np.repeat(np.arange(classes), per_class).astype(np.int64)
    for c in range(classes):  # a learnable signal: each class brightens its own channel
        x[y == c, c] = np.clip(x[y == c, c].astype(int) + 80, 0, 255).astype(np.uint8)
    return Dataset("tiny", Split(x, y), Split(x[:6], y[:6]), [str(c) for c in range(classes)])


TRAINING = {"batch_size": 8, "optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0, "augment": "none"}


def _job(settings, seed=0, target=1, ds=None):
    import torch

    s = Narcissus.check_learn({"model": "smallcnn", "epochs": 1, "rounds": 2, **settings}, KEY)
    job = LearnJob(dataset=ds or _dataset(), target=target, seed=seed, params={"eps": EPS}, settings=s,
                   training=dict(TRAINING), device=torch.device("cpu"))
    calls = []
    fit = job.fit

    def spy(images, labels, model, epochs, **kw):  # record every training job.fit runs
        res = fit(images, labels, model, epochs, **kw)
        calls.append({"images": images, "labels": labels, "epochs": epochs, "kw": kw, "model": res.model})
        return res

    job.fit = spy
    return job, calls


def _tiny_surrogate(classes=5, size=16):
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * size * size, classes))


# ---- a round is one pass over the target class -----------------------------------------------------

def test_each_round_visits_every_image_once():
    seen = {}
    imgs = _images(37)
    optimize_trigger(_tiny_surrogate(), imgs, 2, eps=EPS, rounds=4, lr=0.01, batch_size=8, seed=3,
                     on_batch=lambda r, idx: seen.setdefault(r, []).append(idx.copy()))
    assert sorted(seen) == [0, 1, 2, 3]
    orders = []
    for r, batches in seen.items():
        assert [len(b) for b in batches] == [8, 8, 8, 8, 5]  # ceil(37 / 8) batches, the last one short
        counts = np.bincount(np.concatenate(batches), minlength=37)
        np.testing.assert_array_equal(counts, np.ones(37, int))  # every image exactly once per round
        orders.append(np.concatenate(batches))
    assert not np.array_equal(orders[0], orders[1])  # a fresh permutation each round


def test_trigger_is_bounded_deterministic_and_leaves_the_surrogate_as_it_was():
    import torch

    model = _tiny_surrogate()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    imgs = _images(20)
    kw = dict(eps=EPS, rounds=3, lr=0.01, batch_size=8, seed=5)
    t1, t2 = optimize_trigger(model, imgs, 1, **kw), optimize_trigger(model, imgs, 1, **kw)
    np.testing.assert_array_equal(t1, t2)
    assert t1.shape == (3, 16, 16) and t1.dtype == np.float32 and 0 < np.abs(t1).max() <= EPS + 1e-7
    assert not np.array_equal(t1, optimize_trigger(model, imgs, 1, **{**kw, "seed": 6}))
    assert not model.training and all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():  # batch-norm statistics restored too
        assert torch.equal(v, state[k]), k


# ---- learn(): surrogate, warm-up, trigger ------------------------------------------------------------

def test_learn_trains_surrogate_then_warms_up_on_the_target_class_only():
    import torch

    ds = _dataset()
    job, calls = _job({"warmup_epochs": 2, "warmup_lr": 0.01, "pool_fraction": 0.5}, target=1, ds=ds)
    out = Narcissus.learn(job)
    assert len(calls) == 2
    surrogate, warm = calls
    # the surrogate: the target class plus half the other classes, their own labels
    assert set(np.unique(surrogate["labels"])) == {0, 1, 2} and (surrogate["labels"] == 1).sum() == 10
    assert len(surrogate["labels"]) == 10 + 10 == int(out["surrogate_pool"])
    # the warm-up: exactly the target-class images, labelled target, starting from the surrogate
    np.testing.assert_array_equal(warm["images"], ds.train.images[ds.train.labels == 1])
    assert (warm["labels"] == 1).all() and warm["epochs"] == 2
    assert warm["kw"]["init_model"] is surrogate["model"]
    assert warm["kw"]["training"]["optimizer"] == "radam" and warm["kw"]["training"]["lr"] == 0.01
    before = torch.cat([p.flatten() for p in surrogate["model"].parameters()])
    after = torch.cat([p.flatten() for p in warm["model"].parameters()])
    assert not torch.equal(before, after)  # the warm-up changed the surrogate
    assert out["trigger"].shape == (3, 16, 16) and 0 < np.abs(out["trigger"]).max() <= EPS + 1e-7


def test_learn_without_warmup_and_with_its_own_batch_size():
    job, calls = _job({"warmup_epochs": 0, "batch_size": 4})
    seen = []
    import poisongrid.attacks.narcissus as narc

    real = narc.optimize_trigger
    narc.optimize_trigger = lambda *a, **kw: (seen.append(kw["batch_size"]), real(*a, **kw))[1]
    try:
        Narcissus.learn(job)
    finally:
        narc.optimize_trigger = real
    assert len(calls) == 1 and seen == [4]


def test_learn_is_deterministic():
    a = Narcissus.learn(_job({"warmup_epochs": 1})[0])
    b = Narcissus.learn(_job({"warmup_epochs": 1})[0])
    np.testing.assert_array_equal(a["trigger"], b["trigger"])
    c = Narcissus.learn(_job({"warmup_epochs": 1}, seed=1)[0])
    assert not np.array_equal(a["trigger"], c["trigger"])


# ---- an out-of-distribution pool -------------------------------------------------------------------

def test_pool_from_a_user_npz(tmp_path):
    f = tmp_path / "ood.npz"
    ood = _images(12, size=12, seed=4)  # another size: resized to the dataset's 16 px
    np.savez(f, images=ood, labels=np.array([5, 9, 7] * 4))
    x, y = load_pool(str(f), 16)
    assert x.shape == (12, 3, 16, 16) and x.dtype == np.uint8 and y.tolist() == [5, 9, 7] * 4

    ds = _dataset()
    job, calls = _job({"pool": str(f), "warmup_epochs": 1}, target=2, ds=ds)
    out = Narcissus.learn(job)
    surrogate, warm = calls
    # the original's layout: OOD classes 0..K-1 (sorted), the target class K; K + 1 outputs
    assert surrogate["kw"]["num_classes"] == 4 and warm["kw"]["num_classes"] == 4
    assert surrogate["labels"].tolist() == [0, 2, 1] * 4 + [3] * 10
    np.testing.assert_array_equal(surrogate["images"][12:], ds.train.images[ds.train.labels == 2])
    assert (warm["labels"] == 3).all() and int(out["surrogate_pool"]) == 22
    import torch

    with torch.no_grad():
        assert surrogate["model"].eval()(torch.zeros(1, 3, 16, 16)).shape == (1, 4)


def test_pool_from_npz_and_folder_loaders(tmp_path):
    f = tmp_path / "ds.npz"
    np.savez(f, x_train=_images(6, 16).transpose(0, 2, 3, 1), y_train=np.array([0, 1, 0, 1, 0, 1]),
             x_test=_images(2, 16), y_test=np.array([0, 1]))
    x, y = load_pool(str(f), 8)
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 1, 0, 1, 0, 1]
    for split, n in (("train", 3), ("test", 1)):
        for c in ("cat", "dog"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_images(1, 20, seed=i)[0].transpose(1, 2, 0)).save(tmp_path / "imgs" / split / c / f"{i}.png")
    x, y = load_pool(str(tmp_path / "imgs"), 16)
    assert x.shape == (6, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]


def test_bad_pool_files(tmp_path):
    f = tmp_path / "bad.npz"
    np.savez(f, images=_images(3), labels=np.array([0.5, 1, 2]))
    with pytest.raises(ConfigError, match="labels"):
        load_pool(str(f), 16)
    np.savez(f, images=_images(3))
    with pytest.raises(ConfigError, match="labels"):
        load_pool(str(f), 16)
    with pytest.raises(ConfigError, match="pool"):
        load_pool(str(tmp_path / "none.npz"), 16)


# ---- settings ----------------------------------------------------------------------------------------

def test_learn_defaults_follow_the_original():
    d = ATTACKS.get("narcissus").learn_defaults
    assert (d["rounds"], d["warmup_epochs"], d["warmup_lr"], d["lr"], d["pool"]) == (1000, 5, 0.1, 0.01, "train")
    assert d["batch_size"] is None and "steps" not in d
    s = Narcissus.check_learn({}, KEY)
    assert s == d
    assert Narcissus.check_learn({"warmup_epochs": 0, "batch_size": 350}, KEY)["batch_size"] == 350


@pytest.mark.parametrize("bad, match", [
    ({"rounds": 0}, "rounds"), ({"rounds": 2.5}, "rounds"), ({"rounds": True}, "rounds"),
    ({"warmup_epochs": -1}, "warmup_epochs"), ({"warmup_epochs": 1.0}, "warmup_epochs"),
    ({"warmup_lr": 0}, "warmup_lr"), ({"lr": -0.1}, "lr"), ({"lr": "fast"}, "lr"),
    ({"batch_size": 0}, "batch_size"), ({"batch_size": 8.5}, "batch_size"), ({"batch_size": False}, "batch_size"),
    ({"pool_fraction": 1.5}, "pool_fraction"), ({"pool_fraction": 0}, "pool_fraction"),
    ({"pool": ""}, "pool"), ({"pool": 3}, "pool"), ({"pool": "/no/such/ood.npz"}, "pool"),
    ({"model": "nosuchnet"}, "model"), ({"steps": 500}, "steps"), ({"epochs": 0}, "epochs"),
])
def test_bad_learn_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        Narcissus.check_learn(bad, KEY)


def test_pool_path_is_checked_only_when_deep(tmp_path):
    assert Narcissus.check_learn({"pool": "/no/such/ood.npz"}, KEY, deep=False)["pool"] == "/no/such/ood.npz"
    (tmp_path / "ood.npz").write_bytes(b"")
    assert Narcissus.check_learn({"pool": str(tmp_path / "ood.npz")}, KEY)["pool"].endswith("ood.npz")


def test_learn_epochs_counts_rounds_and_warmup():
    assert Narcissus.learn_epochs({"epochs": 10, "pool_fraction": 0.5, "warmup_epochs": 5, "rounds": 1000}) == \
        pytest.approx(10 * 0.55 + 100.5)
    assert Narcissus.learn_epochs({"epochs": 10, "pool": "/x.npz", "warmup_epochs": 0, "rounds": 10}) == pytest.approx(11)
