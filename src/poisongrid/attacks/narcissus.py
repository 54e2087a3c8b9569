"""Narcissus (Zeng et al. 2022): a clean-label additive trigger optimised on a surrogate model."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import ConfigError
from .base import ATTACKS, Attack, LearnJob, _short

if TYPE_CHECKING:  # torch is imported lazily: config checks and poisoning do not need it
    import torch


@ATTACKS.register("narcissus")
class Narcissus(Attack):
    """Clean-label: x' = clip(x + trigger); boost (ASR, the reference's 'narcissus x2'):
    clip(x + 2 trigger). `trigger` is a float (C, H, W) array in [0,1] units bounded by `eps` in
    l-inf, produced by the `trigger` stage (`optimize_trigger`). Reference (BaDLoss, CIFAR-10
    only): eps 16/255, trigger optimised for 1000 rounds on a surrogate trained on
    out-of-distribution data plus the target class; the authors' code loads a precomputed file."""

    name = "narcissus"
    clean_label = True
    boostable = True
    defaults = {"eps": 16 / 255}
    # The attacker's surrogate: `model` trained `epochs` on the target class plus `pool_fraction`
    # of the other classes; then `steps` Adam steps at `lr` on target-class batches.
    learn_defaults = {"model": "resnet18", "epochs": 20, "pool_fraction": 0.1, "steps": 1000, "lr": 0.01}

    @classmethod
    def check_learn(cls, settings: dict, key: str, deep: bool = True) -> dict:
        s = super().check_learn(settings, key, deep)
        if s["pool_fraction"] > 1:
            raise ConfigError(f"{key}.pool_fraction", s["pool_fraction"], "a number in (0, 1]")
        if deep:
            from ..models import MODELS

            MODELS.get(s["model"], f"{key}.model")
        return s

    @classmethod
    def learn(cls, job: LearnJob) -> dict[str, np.ndarray]:
        """Train a surrogate on what the attacker holds (the target class plus a fraction of the
        other classes), then minimise its loss toward the target on target-class images under
        the l-inf budget."""
        s, labels = job.settings, job.dataset.train.labels
        rng = job.rng(3)
        others = np.flatnonzero(labels != job.target)
        pool = np.sort(np.concatenate([np.flatnonzero(labels == job.target),
                                       rng.choice(others, size=max(1, int(len(others) * s["pool_fraction"])), replace=False)]))
        job.log(f"surrogate {s['model']} on {len(pool)} images, target class {job.target}")
        res = job.fit(job.dataset.train.images[pool], labels[pool], s["model"], s["epochs"])
        eps = float(job.params.get("eps", cls.defaults["eps"]))
        trig = optimize_trigger(res.model, job.dataset.train.images[labels == job.target], job.target, eps=eps,
                                steps=s["steps"], lr=s["lr"], batch_size=job.training["batch_size"], seed=job.seed,
                                device=job.device, log=job.log)
        job.log(f"trigger done: l-inf {np.abs(trig).max() * 255:.1f}/255")
        return {"trigger": trig.astype(np.float32), "surrogate_pool": np.int64(len(pool))}

    def _setup(self) -> None:
        eps = self._number("eps", 0.0, 1.0)
        if self.artifact is None:
            self.delta = None
            return
        t = self._artifact("trigger")
        t = np.asarray(t, dtype=np.float32)
        if t.shape != self.image_shape:
            raise ConfigError(self._key("trigger"), _short(t), f"an array of shape {self.image_shape}")
        if not np.isfinite(t).all() or np.abs(t).max() > eps + 1e-6:
            raise ConfigError(self._key("trigger"), f"l-inf {np.abs(t).max():.4g}", f"values within [-eps, eps], eps = {eps:.4g}")
        self.delta = np.clip(t, -eps, eps) * np.float32(255)

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        if self.delta is None:
            self._artifact("trigger")
        return x + (2 * self.delta if boost else self.delta)


def optimize_trigger(surrogate: torch.nn.Module, images: np.ndarray, target: int, *, eps: float = 16 / 255,
                     steps: int = 1000, lr: float = 0.01, batch_size: int = 128, seed: int = 0,
                     device: str | torch.device = "cpu", augment: bool = True,
                     log: Callable[[str], None] | None = None) -> np.ndarray:
    """Optimise a Narcissus trigger: delta (C, H, W) in [0,1] units, |delta| <= eps.

    Each round draws a minibatch of the target-class `images` (uint8, (N, C, H, W)), applies
    clamp(x + delta, 0, 1), augments it (random horizontal flip per image and one random shift of
    up to H/16 px for the batch, reflect-padded: the victim augments its poisoned images too) and
    takes an Adam step that lowers the surrogate's cross-entropy toward `target`; delta is then
    projected back to [-eps, eps]. `surrogate` maps [0,1] images to logits; it is used in eval
    mode with frozen parameters and restored afterwards. Starts from delta = 0; all randomness
    comes from a generator seeded with `seed`, so CPU runs are deterministic. With `log`, about
    every 10% of the steps logs the step, the batch loss and the time so far."""
    import time

    import torch
    import torch.nn.functional as F

    x_all = np.asarray(images)
    if x_all.dtype != np.uint8 or x_all.ndim != 4 or len(x_all) == 0:
        raise ValueError(f"images must be a non-empty uint8 (N, C, H, W) array, got {x_all.dtype} {x_all.shape}")
    if not 0 < eps <= 1:
        raise ConfigError("attacks.narcissus.eps", eps, "a number in (0, 1]")
    device = torch.device(device)
    n, c, h, w = x_all.shape
    data = torch.from_numpy(x_all).to(device)  # uint8 on device: 4x smaller than float
    gen = torch.Generator().manual_seed(int(seed))
    shift = max(1, min(h, w) // 16)
    delta = torch.zeros((c, h, w), device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)

    was_training = surrogate.training
    flags = [p.requires_grad for p in surrogate.parameters()]
    surrogate.eval()
    for p in surrogate.parameters():
        p.requires_grad_(False)
    try:
        t0 = time.perf_counter()
        every = max(1, steps // 10)
        with torch.enable_grad():
            for step in range(steps):
                idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
                x = data[idx.to(device)].float().div_(255)
                x = (x + delta).clamp(0, 1)
                if augment:
                    flip = (torch.rand(len(idx), generator=gen) < 0.5).to(device)
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                    dy, dx = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
                    x = F.pad(x, (shift,) * 4, mode="reflect")[:, :, dy:dy + h, dx:dx + w]
                target_t = torch.full((len(idx),), int(target), device=device, dtype=torch.long)
                loss = F.cross_entropy(surrogate(x), target_t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    delta.clamp_(-eps, eps)  # project onto the l-inf ball after every step
                if log and ((step + 1) % every == 0 or step + 1 == steps):
                    from ..training import format_duration

                    # .item() syncs the device, so only on the ~10 logged steps.
                    log(f"narcissus step {step + 1}/{steps} loss {loss.item():.4f} "
                        f"elapsed {format_duration(time.perf_counter() - t0)}")
    finally:
        for p, f in zip(surrogate.parameters(), flags):
            p.requires_grad_(f)
        surrogate.train(was_training)
    return delta.detach().cpu().numpy().astype(np.float32)
