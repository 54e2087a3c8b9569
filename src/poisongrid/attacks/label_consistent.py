"""Label-consistent backdoor (Turner, Tsipras & Madry 2019, "Label-consistent backdoor attacks")."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import ArtifactError, ConfigError
from .base import ATTACKS, Attack, LearnJob, _short
from .l2_invisible import attacker_pool

if TYPE_CHECKING:  # torch is imported lazily: config checks and poisoning do not need it
    import torch

# The reference's 3x3 bottom-right pattern, rows/cols top to bottom, left to right: +1 raises a
# pixel by `amplitude`, -1 lowers it. Not a perfect checkerboard: its top-left cell is -1.
_BOTTOM_RIGHT = np.array([[-1, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=np.float32)
_MAX_EPS = 127 / 255  # perturbations are stored as int8 pixel steps


@ATTACKS.register("label_consistent")
class LabelConsistent(Attack):
    """Clean-label. Training images (target class only, labels kept):
    clip(clip(x + delta) + amplitude * pattern), where delta is the stored adversarial
    perturbation of that dataset row; test trigger (apply): clip(x + amplitude * pattern).

    The pattern is the reference's 3x3 +-1 grid in the bottom-right corner (`corners=1`) or that
    grid in all four corners, mirrored left-right on the left side (`corners=4`, the reference's
    'all-corners'), in every channel. `amplitude` in pixel units: 255 is the original full-
    contrast trigger (the +-255 step saturates to white/black, i.e. the pixels are overwritten);
    smaller values are the paper's reduced-visibility trigger (16, 32, 64 in the paper), added and
    clipped. Train and test use the same amplitude, as in the reference code.

    Learning: the attacker trains a surrogate (`model`, `epochs`) on `pool_fraction` of the
    training set; with `adversarial` (default) it is trained against `adv_steps`-step l-inf PGD at
    `eps` (the paper uses an adversarially trained model, trained much longer than here); then
    every target-class training image gets a `steps`-step untargeted l-inf PGD perturbation
    (sign steps of `step_size`, eps-ball and [0,1] projection, no random start) that raises the
    surrogate's loss on its own label. Stored: `index` (int64 rows of the target class) and
    `delta` (int8, the perturbed image rounded to uint8 minus the clean one). Reference: eps 8/255
    or 16/255, 100 steps."""

    name = "label_consistent"
    clean_label = True
    defaults = {"corners": 1, "amplitude": 255}
    learn_defaults = {"model": "resnet18", "epochs": 20, "pool_fraction": 0.25, "adversarial": True, "adv_steps": 4,
                      "eps": 8 / 255, "steps": 100, "step_size": 1.5 / 255}
    # Madry et al.'s adversarially trained CIFAR-10 model (80,000 steps at batch 128, about 205
    # epochs, PGD-10 at eps 8/255), which the label-consistent paper perturbs against; PGD on the
    # poisoning images: 100 steps of 1.5/255 (BackdoorBench's and the reproductions' setting).
    reference_learn = {"epochs": 205, "pool_fraction": 1.0, "adversarial": True, "adv_steps": 10, "steps": 100}
    reference_source = "Madry et al.'s adversarially trained model, about 205 epochs of PGD-10"

    @classmethod
    def check_learn(cls, settings: dict, key: str, deep: bool = True) -> dict:
        s = super().check_learn(settings, key, deep)
        for k in ("eps", "step_size"):
            if s[k] > _MAX_EPS:
                raise ConfigError(f"{key}.{k}", s[k], f"a number in (0, {_MAX_EPS:.4g}] (127/255)")
        return s

    @classmethod
    def learn_epochs(cls, settings: dict) -> float:
        # Adversarial training costs adv_steps + 1 passes per batch; the final PGD runs `steps`
        # passes over the target class (taken as a tenth of the data).
        per_epoch = (settings["adv_steps"] + 2) if settings["adversarial"] else 1
        return float(settings["epochs"]) * settings["pool_fraction"] * per_epoch + 0.1 * settings["steps"]

    @classmethod
    def learn(cls, job: LearnJob) -> dict[str, np.ndarray]:
        s, labels = job.settings, job.dataset.train.labels
        pool = attacker_pool(job, s["pool_fraction"], 7)
        kw = {}
        if s["adversarial"]:
            kw["step_loss"] = adversarial_loss(s["eps"], s["adv_steps"], 2.5 * s["eps"] / s["adv_steps"])
        job.log(f"surrogate {s['model']} on {len(pool)} images{' (PGD adversarial training)' if s['adversarial'] else ''}")
        res = job.fit(job.dataset.train.images[pool], labels[pool], s["model"], s["epochs"], **kw)
        index = np.flatnonzero(labels == job.target).astype(np.int64)
        delta = pgd_perturb(res.model, job.dataset.train.images[index], labels[index], eps=s["eps"], steps=s["steps"],
                            step_size=s["step_size"], batch_size=job.training["batch_size"], device=job.device,
                            log=job.log)
        job.log(f"perturbed {len(index)} target-class images, l-inf {np.abs(delta).max() if len(delta) else 0}/255")
        return {"index": index, "delta": delta}

    def _setup(self) -> None:
        _, h, w = self.image_shape
        corners = self._int("corners", 1, 4)
        if corners not in (1, 4):
            raise ConfigError(self._key("corners"), corners, "1 (bottom-right) or 4 (all corners)")
        if min(h, w) < (6 if corners == 4 else 3):
            raise ConfigError(self._key("corners"), corners, f"images large enough for the 3x3 patterns (got {h}x{w})")
        amp = self._number("amplitude", 0.0, 255.0)
        self.pattern = amp * trigger_pattern(h, w, corners)
        self.index = self.delta = None
        if self.artifact is None:
            return
        index = np.asarray(self._artifact("index"))
        delta = np.asarray(self._artifact("delta"))
        if index.ndim != 1 or index.dtype.kind not in "iu" or (np.diff(index) <= 0).any():
            raise ConfigError(self._key("index"), _short(index), "strictly increasing integer dataset rows")
        if delta.dtype != np.int8 or delta.shape != (len(index), *self.image_shape):
            raise ConfigError(self._key("delta"), _short(delta), f"an int8 array of shape ({len(index)}, {', '.join(map(str, self.image_shape))})")
        self.index, self.delta = index.astype(np.int64), delta

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        if self.index is None:
            self._artifact("delta")
        return x + self.pattern

    def poison(self, images: np.ndarray, index: np.ndarray) -> np.ndarray:
        """The stored adversarial perturbation of each row, then the trigger."""
        if self.index is None:
            self._artifact("delta")
        rows = np.asarray(index, dtype=np.int64)
        if len(rows) != len(images):
            raise ValueError(f"{self.name}: {len(images)} images for {len(rows)} rows")
        pos = np.searchsorted(self.index, rows)
        found = (pos < len(self.index)) & (self.index[np.minimum(pos, len(self.index) - 1)] == rows)
        if not found.all():
            raise ArtifactError(f"{self.name}: no adversarial perturbation for training rows {rows[~found][:10].tolist()} "
                                f"(the trigger file holds the target class's rows only)")
        perturbed = np.clip(images.astype(np.int16) + self.delta[pos], 0, 255).astype(np.uint8)
        return self.apply(perturbed)


def trigger_pattern(h: int, w: int, corners: int) -> np.ndarray:
    """(H, W) float32 of +-1 on the trigger pixels, 0 elsewhere."""
    p = np.zeros((h, w), dtype=np.float32)
    p[h - 3:, w - 3:] = _BOTTOM_RIGHT
    if corners == 4:
        p[:3, w - 3:] = _BOTTOM_RIGHT
        p[:3, :3] = p[h - 3:, :3] = _BOTTOM_RIGHT[:, ::-1]
    return p


def _pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step_size: float) -> torch.Tensor:
    """Untargeted l-inf PGD from x (no random start): sign steps raising the loss on y."""
    import torch
    import torch.nn.functional as F

    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = torch.minimum(torch.maximum(adv + step_size * grad.sign(), x - eps), x + eps).clamp_(0, 1)
    return adv.detach()


def adversarial_loss(eps: float, steps: int, step_size: float) -> Callable:
    """A `step_loss` for training.fit: cross-entropy on PGD examples of the batch (Madry et al.),
    the attack run with the model in eval mode so it does not move the batch-norm statistics."""
    import torch.nn.functional as F

    def loss(model, x, y, per_example_ce, idx):
        flags = [p.requires_grad for p in model.parameters()]
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            adv = _pgd(model, x.detach().float(), y, eps, steps, step_size)
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
            model.train()
        return F.cross_entropy(model(adv), y)

    return loss


def pgd_perturb(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *, eps: float, steps: int,
                step_size: float, batch_size: int = 128, device: str | torch.device = "cpu",
                log: Callable[[str], None] | None = None) -> np.ndarray:
    """int8 (N, C, H, W) pixel-step perturbations: round(255 * PGD image) - image, so that
    image + delta is the rounded adversarial image and |delta| <= round(255 eps). Deterministic."""
    import torch

    if not 0 < eps <= _MAX_EPS:
        raise ConfigError("attacks.label_consistent.learn.eps", eps, f"a number in (0, {_MAX_EPS:.4g}]")
    device = torch.device(device)
    was_training, flags = model.training, [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    out = np.zeros(images.shape, dtype=np.int8)
    try:
        with torch.enable_grad():
            for i in range(0, len(images), batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
                yb = torch.from_numpy(np.asarray(labels[i:i + batch_size], dtype=np.int64)).to(device)
                adv = _pgd(model, xb.float() / 255, yb, eps, steps, step_size)
                q = torch.round(adv * 255).clamp_(0, 255) - xb.float()
                out[i:i + batch_size] = q.cpu().numpy().astype(np.int8)
                if log:
                    log(f"label_consistent PGD {min(i + batch_size, len(images))}/{len(images)} images")
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    return out
