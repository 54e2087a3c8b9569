"""CUDA paths (bf16 autocast, channels-last, resume). Skipped on machines without a GPU."""
import numpy as np
import pytest
import torch

from poisongrid.training import fit, predict

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda") if torch.cuda.is_available() else None


def _data(n=2048, size=32, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 60, size=(n, 3, size, size)).astype(np.uint8)
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, :, r * size // 2:(r + 1) * size // 2, q * size // 2:(q + 1) * size // 2] += 150
    return x, y


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_cuda_training_learns_and_records(precision):
    x, y = _data()
    tr = dict(model="resnet18", epochs=3, batch_size=256, lr=1e-3, weight_decay=1e-4, augment="none", precision=precision)
    res = fit(tr, x, y, 4, seed=0, device=CUDA, record="eval")
    assert res.losses.shape == (3, len(y)) and np.isfinite(res.losses).all()
    assert (predict(res.model, x, CUDA) == y).mean() > 0.9


def test_cuda_resume_matches_uninterrupted_run(tmp_path):
    x, y = _data()
    tr = dict(model="resnet18", epochs=4, batch_size=256, lr=1e-3, weight_decay=1e-4, augment="crop_flip")
    ref = fit(tr, x, y, 4, seed=0, device=CUDA, record="eval")

    class Killed(Exception):
        pass

    def kill(msg):
        if msg.startswith("epoch 2/") and "checkpoint saved" in msg:
            raise Killed()

    ckpt = str(tmp_path / "c.ckpt")
    with pytest.raises(Killed):
        fit(tr, x, y, 4, seed=0, device=CUDA, record="eval", checkpoint=ckpt, fingerprint="f", log=kill)
    msgs = []
    res = fit(tr, x, y, 4, seed=0, device=CUDA, record="eval", checkpoint=ckpt, fingerprint="f", log=msgs.append)
    assert any("continuing at epoch 3/4" in m for m in msgs)
    np.testing.assert_array_equal(res.losses[:2], ref.losses[:2])  # restored from the checkpoint
    # cuDNN kernels are not bit-deterministic, so two uninterrupted runs differ too: the resumed run
    # must be as close to the uninterrupted one as a second uninterrupted run is.
    again = fit(tr, x, y, 4, seed=0, device=CUDA, record="eval")
    noise = float(np.abs(again.losses - ref.losses).max())
    gap = float(np.abs(res.losses - ref.losses).max())
    print(f"max |loss difference|: resumed vs uninterrupted {gap:.3g}, two uninterrupted runs {noise:.3g}")
    assert gap <= 3 * noise + 1e-3


def _params(model):
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_graphed_step_matches_the_eager_step(optimizer):
    """Same seed, same batches, same fused optimiser: the graph-replayed run records the eager
    run's per-example losses and ends at its weights, as closely as two eager runs agree. A
    learning rate frozen in the graph (the schedule ignored) would put the weights far apart."""
    x, y = _data(n=2048)
    tr = dict(model="resnet18", epochs=3, batch_size=128, optimizer=optimizer, lr=1e-3 if optimizer == "adamw" else 0.05,
              weight_decay=5e-4, augment="crop_flip")
    eager = fit(tr, x, y, 4, seed=0, device=CUDA, record="train", graphs=False)
    again = fit(tr, x, y, 4, seed=0, device=CUDA, record="train", graphs=False)
    graphed = fit(tr, x, y, 4, seed=0, device=CUDA, record="train", graphs=True)
    assert graphed.graphed and not eager.graphed
    loss_noise = float(np.abs(again.losses - eager.losses).max())
    loss_gap = float(np.abs(graphed.losses - eager.losses).max())
    w_noise = float((_params(again.model) - _params(eager.model)).abs().max())
    w_gap = float((_params(graphed.model) - _params(eager.model)).abs().max())
    print(f"{optimizer}: max |loss diff| graphed-eager {loss_gap:.3g}, eager-eager {loss_noise:.3g}; "
          f"max |weight diff| {w_gap:.3g} vs {w_noise:.3g}")
    assert loss_gap <= 3 * loss_noise + 5e-3
    assert w_gap <= 3 * w_noise + 1e-4
    np.testing.assert_allclose(graphed.train_loss, eager.train_loss, rtol=0.02, atol=0.01)


def test_graphed_training_learns_like_eager():
    """Loss curve and final accuracy of a graphed run stay within run-to-run tolerance of eager."""
    x, y = _data(n=4096, seed=1)
    xt, yt = _data(n=1024, seed=2)
    # No flip: it would swap the planted left and right quadrants' classes.
    tr = dict(model="resnet18", epochs=4, batch_size=256, lr=1e-3, weight_decay=1e-4, augment="none")
    runs = {g: fit(tr, x, y, 4, seed=0, device=CUDA, record="eval", graphs=g) for g in (False, True)}
    acc = {g: float((predict(r.model, xt, CUDA) == yt).mean()) for g, r in runs.items()}
    print("train loss eager", runs[False].train_loss, "graphed", runs[True].train_loss, "accuracy", acc)
    assert runs[True].graphed
    assert acc[True] > 0.9 and abs(acc[True] - acc[False]) <= 0.03
    np.testing.assert_allclose(runs[True].train_loss, runs[False].train_loss, rtol=0.1, atol=0.02)


def test_graph_falls_back_where_the_step_is_not_fixed():
    """A remedy's own step objective, an optimiser without a capturable step, or too few full
    batches: eager, and still right."""
    x, y = _data(n=1024)
    tr = dict(model="resnet18", epochs=1, batch_size=128, lr=1e-3, weight_decay=1e-4, augment="none")
    assert fit(tr, x, y, 4, seed=0, device=CUDA).graphed
    assert not fit({**tr, "optimizer": "radam"}, x, y, 4, seed=0, device=CUDA).graphed
    assert not fit({**tr, "batch_size": 512}, x, y, 4, seed=0, device=CUDA).graphed
    hooked = fit(tr, x, y, 4, seed=0, device=CUDA, step_loss=lambda m, xf, yb, per, idx: per.mean())
    assert not hooked.graphed and np.isfinite(hooked.train_loss).all()


def test_graphed_weights_and_partial_batch():
    """Per-example weights (negative: clamped ascent) inside the graph, a last batch of another
    size run eagerly between replays: every example recorded each epoch, finite losses."""
    x, y = _data(n=1000)
    w = np.ones(len(y), dtype=np.float32)
    w[:50] = -0.5
    tr = dict(model="resnet18", epochs=2, batch_size=128, lr=1e-3, weight_decay=1e-4, augment="crop_flip")
    g = fit(tr, x, y, 4, seed=0, device=CUDA, record="train", weights=w, ascent_clamp=5.0, graphs=True)
    e = fit(tr, x, y, 4, seed=0, device=CUDA, record="train", weights=w, ascent_clamp=5.0, graphs=False)
    assert g.graphed and g.losses.shape == (2, 1000) and np.isfinite(g.losses).all()
    np.testing.assert_allclose(g.train_loss, e.train_loss, rtol=0.05, atol=0.02)
