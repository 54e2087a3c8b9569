"""Frequency analysis: a small CNN on the images' DCT spectra tells triggered images from clean ones."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import DETECTORS, Detector, ScoreWriter

# The reference patch sizes and corner margins are in pixels of a 32 x 32 image.
REF_SIZE = 32
PATCH_MIN, PATCH_MAX, MARGIN_MAX = 2, 7, 5
MIN_IMAGE = 8  # three 2x2 max-pools


def dct_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n x n): D @ v is scipy.fft.dct(v, norm='ortho')."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


class DCT2d(nn.Module):
    """Per-channel 2-D orthonormal DCT-II of (N, C, H, W) images, as two matrix products."""

    def __init__(self, height: int, width: int):
        super().__init__()
        # Kept in float64 (cast per call) so a float64 input gets an exact transform.
        self.register_buffer("dh", dct_matrix(height))
        self.register_buffer("dw", dct_matrix(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dh.to(x.dtype) @ x @ self.dw.to(x.dtype).T


def freq_cnn(channels: int, height: int, width: int) -> nn.Module:
    """The 6-conv detector network of the BaDLoss reference (after Zeng et al.'s Keras model):
    three stages of two 3x3 conv -> BN -> ELU, each followed by a 2x2 max-pool and channel
    dropout (0.2, 0.3, 0.4), then one linear layer to 2 logits (clean, poisoned)."""
    layers: list[nn.Module] = []
    cin = channels
    for cout, drop in ((32, 0.2), (64, 0.3), (128, 0.4)):
        for _ in range(2):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ELU()]
            cin = cout
        layers += [nn.MaxPool2d(2), nn.Dropout2d(drop)]
    layers += [nn.Flatten(), nn.Linear((height // 8) * (width // 8) * 128, 2)]
    return nn.Sequential(*layers)


def patch_ranges(size: int, scale: bool) -> tuple[int, int, int]:
    """(smallest side, largest side, largest corner margin) of the synthetic patches for images of
    `size` pixels: the reference's 2-7 px sides and 0-5 px margins, scaled by size / 32 if asked."""
    if not scale:
        lo, hi, margin = PATCH_MIN, PATCH_MAX, MARGIN_MAX
    else:
        s = size / REF_SIZE
        lo = max(1, math.floor(PATCH_MIN * s + 0.5))
        hi = max(lo, math.floor(PATCH_MAX * s + 0.5))
        margin = math.floor(MARGIN_MAX * s + 0.5)
    hi = min(hi, size)
    return min(lo, hi), hi, max(0, min(margin, size - hi))


def add_random_patches(x: torch.Tensor, gen: torch.Generator, scale: bool = False) -> torch.Tensor:
    """A copy of the float images x (N, C, H, W, in [0, 1]) with one patch each, as in the BaDLoss
    reference: a white block or a block of uniform noise, each side drawn from the patch range,
    at one random margin (the same from both edges) from one of the four corners."""
    out = x.clone()
    n, c, h, w = x.shape
    lo_h, hi_h, m_h = patch_ranges(h, scale)
    lo_w, hi_w, m_w = patch_ranges(w, scale)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    for j in range(n):
        ph, pw = draw(lo_h, hi_h), draw(lo_w, hi_w)
        mh = mw = draw(0, min(m_h, m_w))
        corner = draw(0, 3)
        top = mh if corner in (0, 1) else h - mh - ph
        left = mw if corner in (0, 2) else w - mw - pw
        block = torch.ones(c, ph, pw) if draw(0, 1) == 0 else torch.rand(c, ph, pw, generator=gen)
        out[j, :, top:top + ph, left:left + pw] = block.to(x.dtype)
    return out


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


@DETECTORS.register("frequency_analysis")
class FrequencyAnalysis(Detector):
    """Frequency analysis (Zeng et al., ICCV 2021) as BaDLoss runs it: a CNN on the per-channel
    2-D orthonormal DCT of each image (in [0, 1]) learns to tell the bona fide examples (label 0)
    from copies of them carrying a synthetic trigger (label 1); every training example is then
    scored by its softmax probability of being triggered (p >= 0.5 is BaDLoss's flag).

    As in the BaDLoss reference: only the bona fide examples are used, one fixed patched copy
    each; the patches are white or uniform-noise blocks at a random margin from a random corner
    (Zeng's Gaussian-noise, shadow and blend corruptions are not used); Conv -> BN -> ELU with
    channel dropout; Adadelta (lr 0.05, weight decay 1e-4, torch's rho 0.9 and eps 1e-6), batch 32,
    10 epochs, no schedule. The patches' sides (2-7 px) and their corner margin (0-5 px, one draw
    for both edges) stay fixed at any image size, as in the reference (also at 224 px); with
    `scale_patch: true` they scale with the image size / 32 (rounded, sides at least 1 px), about
    7x at 224 px, recorded in the scores' metadata (`budget`) and marked in the tables.
    The network is trained by its own short loop, not training.fit: it is the detector's own
    binary classifier on DCT inputs with Adadelta and no schedule. Deterministic given the cell's
    seed (bit-equal on CPU)."""

    type = "frequency_analysis"
    needs = ("images",)
    default_model = None
    gpu = True
    cost_epochs = 1.0
    min_bona_fide = 10
    params = {"epochs": 10, "lr": 0.05, "weight_decay": 1e-4, "batch_size": 32, "scale_patch": False,
              "infer_batch": 1024}

    @classmethod
    def check(cls, det: dict, key: str, cfg: dict, bona) -> None:
        super().check(det, key, cfg, bona)
        p = {**cls.params, **det}
        for k in ("epochs", "batch_size", "infer_batch"):
            cls.positive(f"{key}.{k}", p[k], integer=True)
        cls.positive(f"{key}.lr", p["lr"])
        wd = p["weight_decay"]
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd < 0:
            raise ConfigError(f"{key}.weight_decay", wd, "a number >= 0")

    def _train(self, clean: torch.Tensor, device: torch.device) -> nn.Module:
        """Fit the DCT classifier on the bona fide images (float, [0, 1]) and patched copies."""
        view = self.view
        bad = add_random_patches(clean, view.generator(1), self.p["scale_patch"])
        x = torch.cat([clean, bad])
        y = torch.cat([torch.zeros(len(clean), dtype=torch.int64), torch.ones(len(bad), dtype=torch.int64)])
        _, c, h, w = clean.shape
        devices = [device] if device.type == "cuda" else []
        # Initialisation and dropout draw from the global RNGs: seed them, then restore them.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_seed(view.generator(2)))
            dct = DCT2d(h, w).to(device)
            net = freq_cnn(c, h, w).to(device)
            opt = torch.optim.Adadelta(net.parameters(), lr=float(self.p["lr"]), weight_decay=float(self.p["weight_decay"]))
            order_gen = view.generator(3)
            x_dev, y_dev = dct(x.to(device)), y.to(device)
            bs = int(self.p["batch_size"])
            net.train()
            for epoch in range(int(self.p["epochs"])):
                perm = torch.randperm(len(y), generator=order_gen).to(device)
                total = 0.0
                for s in range(0, len(y), bs):
                    idx = perm[s:s + bs]
                    loss = F.cross_entropy(net(x_dev[idx]), y_dev[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                view.log(f"frequency_analysis epoch {epoch + 1}: loss {total / len(y):.4f}")
        net.eval()
        return nn.Sequential(dct, net)

    @torch.no_grad()
    def _p_poisoned(self, model: nn.Module, images, device: torch.device) -> np.ndarray:
        from ..training import gather_batch

        out = np.empty(len(images), dtype=np.float64)
        bs = int(self.p["infer_batch"])
        for s in range(0, len(images), bs):
            idx = torch.arange(s, min(s + bs, len(images)))
            x = gather_batch(images, idx, device).float().div_(255.0)
            out[s:s + len(idx)] = F.softmax(model(x).float(), dim=1)[:, 1].double().cpu().numpy()
        return out

    def score(self, out_path) -> dict:
        view = self.view
        images = view.images
        h, w = images.shape[-2:]
        if min(h, w) < MIN_IMAGE:
            raise ConfigError("image_size", f"{h}x{w}", f"at least {MIN_IMAGE} px for the frequency_analysis network")
        bona = np.flatnonzero(view.bona_fide)
        if len(bona) < self.min_bona_fide:
            raise ConfigError("bona_fide.n_clean", len(bona), f"at least {self.min_bona_fide} bona fide examples for frequency_analysis")
        device = view.device
        clean = torch.from_numpy(np.asarray(images[bona])).float().div_(255.0)
        model = self._train(clean, device)
        p = self._p_poisoned(model, images, device)
        meta = {"cell": self.cell, "detector": self.type, "params": self.p, "n_bona_fide": int(len(bona)),
                "patch_range_px": list(patch_ranges(min(h, w), self.p["scale_patch"])),
                "budget": (f"patches scaled to {min(h, w)} px images (sides {patch_ranges(min(h, w), True)[0]}-"
                           f"{patch_ranges(min(h, w), True)[1]} px; reference 2-7 px)"
                           if self.p["scale_patch"] and min(h, w) != REF_SIZE else None),
                "n_flagged_at_0.5": int((p >= 0.5).sum()),
                "p_bona_fide_mean": float(p[bona].mean())}
        with ScoreWriter(out_path, meta, self.view) as wr:
            wr.write(view.index, p)
        return meta
