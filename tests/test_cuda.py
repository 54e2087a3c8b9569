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
