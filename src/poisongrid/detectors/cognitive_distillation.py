"""Cognitive Distillation: the smallest input mask that keeps the model's logits (small = suspicious)."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import ConfigError
from .base import DETECTORS, Detector, ScoreWriter

NOISE_STREAM = 7301  # view.generator stream of the background colours; one sub-stream per example index


def example_noise(ctx_generator, index: np.ndarray, steps: int, channels: int) -> torch.Tensor:
    """The flat background colour of every step for each example, (b, steps, channels) in [0, 1).

    Drawn from a generator seeded by the example's own index, so an example's colours do not
    depend on which batch it lands in or on the batch size."""
    return torch.stack([torch.rand(steps, channels, generator=ctx_generator(NOISE_STREAM, int(i))) for i in index])


def total_variation(m: torch.Tensor) -> torch.Tensor:
    """Per-image squared-difference total variation of (b, 1, h, w) masks, divided by h * w."""
    h, w = m.shape[-2:]
    dv = (m[:, :, 1:, :] - m[:, :, :-1, :]).pow(2).sum((1, 2, 3))
    dh = (m[:, :, :, 1:] - m[:, :, :, :-1]).pow(2).sum((1, 2, 3))
    return (dv + dh) / (m.shape[1] * h * w)


def distill(model: torch.nn.Module, x: torch.Tensor, noise: torch.Tensor, *, lr: float = 0.1, alpha: float = 0.01,
            beta: float = 1.0, amp: bool = False) -> torch.Tensor:
    """Optimise one single-channel mask per image of x (float (b, c, h, w) in [0, 1]) so that
    x * m + (1 - m) * colour keeps the logits of x; noise (b, steps, c) gives the colour of each
    step. Returns the final masks (b, 1, h, w), on x's device.

    The per-image losses are SUMMED over the batch: each mask's gradient is then exactly that of
    its own loss, and Adam works element-wise, so a mask does not depend on its batch-mates
    (the model is in eval mode, so no batch statistics mix the images either)."""
    b, c, h, w = x.shape
    steps = noise.shape[1]
    noise = noise.to(x.device, torch.float32)
    use_amp = amp and x.device.type == "cuda"
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
        z = model(x).float()
    theta = torch.ones(b, 1, h, w, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr, betas=(0.1, 0.1))
    for t in range(steps):
        m = (torch.tanh(theta) + 1) / 2
        x_cp = x * m + (1 - m) * noise[:, t, :, None, None]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(x_cp).float()
        per_image = (out - z).abs().mean(1) + alpha * m.abs().sum((1, 2, 3)) + beta * total_variation(m)
        opt.zero_grad(set_to_none=True)
        per_image.sum().backward()
        opt.step()
    with torch.no_grad():
        return (torch.tanh(theta) + 1) / 2


@DETECTORS.register("cognitive_distillation")
class CognitiveDistillation(Detector):
    """Cognitive Distillation (Huang et al., ICLR 2023) as BaDLoss runs it: for every training
    image, the attacked model (eval mode, weights frozen) and a single-channel mask
    m = (tanh(theta) + 1) / 2 (theta starts at 1) optimised by Adam (lr 0.1, betas 0.1/0.1) for
    `steps` steps on mean |logits(x) - logits(x*m + (1-m)*colour)| + alpha * ||m||_1 + beta * TV(m)
    (TV: squared neighbour differences / (h*w)); the colour is a random flat colour per image and
    channel, redrawn every step. A backdoor trigger alone keeps the logits, so a poisoned image
    needs a small mask: score = -||m||_1 (higher = more suspicious). BaDLoss then removes the 15%
    with the smallest masks (remedy `remove`, r_reject 0.15).

    Deviations: the per-image losses are summed over a batch instead of averaged (each mask gets
    its own gradient; Adam is nearly scale-invariant, so only its epsilon sees the difference);
    each image's colours come from a generator seeded by its index (batch-independent); the
    BaDLoss z-standardisation by the bona fide norms is left out (monotone, ranking unchanged).
    Cost: 1 + steps forward and steps backward passes (to the input) per image, about `steps`
    epochs of training; every example is scored (no subsampling). `cost_epochs` assumes the
    default 100 steps."""

    type = "cognitive_distillation"
    needs = ("weights", "images")
    default_model = "attacked"
    gpu = True
    cost_epochs = 100.0
    params = {"steps": 100, "lr": 0.1, "alpha": 0.01, "beta": 1.0, "batch_size": 256, "amp": False}

    @classmethod
    def epochs(cls, det: dict, data: dict) -> float:
        return float(det.get("steps", cls.params["steps"])) + 1

    @classmethod
    def check(cls, det: dict, key: str, cfg: dict, bona) -> None:
        super().check(det, key, cfg, bona)
        p = {**cls.params, **det}
        cls.positive(f"{key}.steps", p["steps"], integer=True)
        cls.positive(f"{key}.batch_size", p["batch_size"], integer=True)
        cls.positive(f"{key}.lr", p["lr"])
        for k in ("alpha", "beta"):
            if p[k] < 0:
                raise ConfigError(f"{key}.{k}", p[k], "a number >= 0")

    def masks(self, index: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """The final masks of the training examples at `rows` (manifest positions) with manifest
        indices `index`, (b, 1, h, w) on the CPU."""
        from ..training import gather_batch, to_float

        view = self.view
        x = to_float(gather_batch(view.images, torch.from_numpy(rows), view.device), False)
        noise = example_noise(view.generator, index, int(self.p["steps"]), x.shape[1])
        m = distill(view.model(), x, noise, lr=self.p["lr"], alpha=self.p["alpha"], beta=self.p["beta"], amp=self.p["amp"])
        return m.cpu()

    def score(self, out_path) -> dict:
        view = self.view
        index, n, bs = view.index, len(view), int(self.p["batch_size"])
        model = view.model()
        frozen = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)  # gradients to the input only
        norms = np.empty(n, dtype=np.float64)
        meta = {"cell": self.cell, "detector": self.type, "params": self.p, "n_examples": n}
        t0 = time.perf_counter()
        try:
            with ScoreWriter(out_path, meta, self.view) as w:
                for s in range(0, n, bs):
                    rows = np.arange(s, min(s + bs, n))
                    m = self.masks(index[rows], rows)
                    norms[rows] = m.sum((1, 2, 3)).double().numpy()
                    w.write(index[rows], -norms[rows])
                    view.log(f"cognitive distillation: {rows[-1] + 1}/{n} images, {time.perf_counter() - t0:.1f}s")
                elapsed = time.perf_counter() - t0
                h, w_ = view.images.shape[-2:]
                meta.update(self._stats(norms, h * w_))
                meta.update({"optimisation_s": elapsed, "images_per_s": n / max(elapsed, 1e-9),
                             "forward_backward_passes": n * int(self.p["steps"]), "device": str(view.device)})
        finally:
            for p, g in zip(model.parameters(), frozen):
                p.requires_grad_(g)
        return meta

    def _stats(self, norms: np.ndarray, pixels: int) -> dict:
        """Mask-norm statistics: overall, of the bona fide examples and per trained-on label."""
        view = self.view
        bona, labels = view.bona_fide, view.labels
        q = [0.01, 0.05, 0.15, 0.5, 0.95]
        if not len(norms):
            return {"mask_pixels": int(pixels)}
        out = {"mask_pixels": int(pixels), "norm_mean": float(norms.mean()), "norm_std": float(norms.std()),
               "norm_min": float(norms.min()), "norm_max": float(norms.max()),
               "norm_quantiles": dict(zip(map(str, q), map(float, np.quantile(norms, q)))),
               "norm_mean_by_label": {int(c): float(norms[labels == c].mean()) for c in np.unique(labels)}}
        if bona.any():
            out["bona_fide_norm_mean"], out["bona_fide_norm_std"] = float(norms[bona].mean()), float(norms[bona].std())
        return out
