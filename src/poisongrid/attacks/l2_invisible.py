"""l2-invisible (Li et al. 2020, TDSC, "Invisible backdoor attacks on deep neural networks via
steganography and regularization", the Lp-regularisation attack with p = 2)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import ConfigError
from .base import ATTACKS, Attack, LearnJob, _short

if TYPE_CHECKING:  # torch is imported lazily: config checks and poisoning do not need it
    import torch


def attacker_pool(job: LearnJob, fraction: float, stream: int) -> np.ndarray:
    """Sorted training rows the attacker holds: a seeded `fraction` of the training set."""
    n = len(job.dataset.train.labels)
    k = max(1, int(round(n * fraction)))
    return np.sort(job.rng(stream).choice(n, size=k, replace=False))


@ATTACKS.register("l2_invisible")
class L2Invisible(Attack):
    """Dirty-label: x' = clip(x + 255 trigger), label -> target. `trigger` is a float32 (C, H, W)
    array in [0,1] units over the whole image with l2 norm <= `l2_bound` (checked when built).

    Learning (after the paper's Lp-regularised trigger, TrojanNN-style): the attacker trains a
    surrogate (`model`, `epochs`) on `pool_fraction` of the training set, selects the `neurons`
    penultimate-layer units most strongly connected to the output layer (largest summed |weight|
    in the last linear layer, TrojanNN's selection rule applied to the layer we can address for
    every model), and starting from Gaussian noise runs `steps` Adam steps (`lr`) maximising
    their mean activation on pool images carrying the trigger, plus `reg` x ||trigger||_2 (the
    paper's l2 regulariser). After every step the trigger is projected onto the l2 ball of
    radius `l2_bound` (the paper controls the norm only through the penalty: the hard bound is
    ours). The final trigger is quantised toward zero to whole pixel steps (k/255), so on uint8
    images the change of every image is at most `l2_bound` in l2 ([0,1] units) exactly.
    Deviations: the paper's target activation value and loss (squared distance to it) are
    replaced by plain activation maximisation; its neuron selection reads the weights into the
    neuron, ours the weights out of it. LfD gives no norm: the default 2.0 is an RMS of about
    9/255 per value at 32 px."""

    name = "l2_invisible"
    defaults = {"l2_bound": 2.0}
    learn_defaults = {"model": "resnet18", "epochs": 20, "pool_fraction": 0.1, "steps": 500, "lr": 0.01,
                      "reg": 0.01, "neurons": 1}

    @classmethod
    def learn_epochs(cls, settings: dict) -> float:
        return float(settings["epochs"]) * float(settings["pool_fraction"])

    @classmethod
    def learn_graphed_epochs(cls, settings: dict) -> float:
        return cls.learn_epochs(settings)  # a plain training run; the trigger's own steps are few

    @classmethod
    def learn(cls, job: LearnJob) -> dict[str, np.ndarray]:
        s = job.settings
        bound = float(job.params.get("l2_bound", cls.defaults["l2_bound"]))
        pool = attacker_pool(job, s["pool_fraction"], 5)
        images, labels = job.dataset.train.images[pool], job.dataset.train.labels[pool]
        job.log(f"surrogate {s['model']} on {len(pool)} images")
        res = job.fit(images, labels, s["model"], s["epochs"])
        trig = optimize_l2_trigger(res.model, images, bound=bound, steps=s["steps"], lr=s["lr"], reg=s["reg"],
                                   neurons=s["neurons"], batch_size=job.training["batch_size"], seed=job.seed,
                                   device=job.device, log=job.log)
        job.log(f"trigger done: l2 {np.linalg.norm(trig):.4f} (bound {bound:g})")
        return {"trigger": trig}

    def _setup(self) -> None:
        c, h, w = self.image_shape
        bound = self._number("l2_bound", 0.0, float(np.sqrt(c * h * w)))  # beyond: more than any image can move
        if self.artifact is None:
            self.delta = None
            return
        t = np.asarray(self._artifact("trigger"), dtype=np.float32)
        if t.shape != self.image_shape:
            raise ConfigError(self._key("trigger"), _short(t), f"an array of shape {self.image_shape}")
        norm = float(np.linalg.norm(t.astype(np.float64))) if np.isfinite(t).all() else np.inf
        if norm > bound * (1 + 1e-6):
            raise ConfigError(self._key("trigger"), f"l2 {norm:.6g}", f"a trigger of l2 norm <= l2_bound = {bound:g}")
        self.delta = t * np.float32(255)

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        if self.delta is None:
            self._artifact("trigger")
        return x + self.delta


def project_l2(t: np.ndarray | torch.Tensor, bound: float):
    """`t` scaled onto the l2 ball of radius `bound` (unchanged inside it)."""
    norm = float((t.double() ** 2).sum().sqrt()) if hasattr(t, "double") else float(np.linalg.norm(t.astype(np.float64)))
    return t if norm <= bound else t * (bound / norm)


def quantize(t: np.ndarray) -> np.ndarray:
    """Whole pixel steps k/255, rounded toward zero: no value grows, so neither does the norm."""
    return (np.fix(np.asarray(t, dtype=np.float64) * 255) / 255).astype(np.float32)


def optimize_l2_trigger(surrogate: torch.nn.Module, images: np.ndarray, *, bound: float, steps: int = 500,
                        lr: float = 0.01, reg: float = 0.01, neurons: int = 1, batch_size: int = 128, seed: int = 0,
                        device: str | torch.device = "cpu", log: Callable[[str], None] | None = None) -> np.ndarray:
    """The l2-invisible trigger: float32 (C, H, W) in [0,1] units, l2 norm <= `bound`, multiples
    of 1/255. Maximises the mean penultimate activation of the `neurons` most connected units of
    `surrogate` (maps [0,1] images to logits) on minibatches of `images` (uint8 N,C,H,W) carrying
    clamp(x + trigger, 0, 1), minus `reg` x the trigger's l2 norm; projected after every step.
    Deterministic from `seed` on CPU; the surrogate's mode and grad flags are restored."""
    import torch

    from ..models import penultimate_module

    x_all = np.asarray(images)
    if x_all.dtype != np.uint8 or x_all.ndim != 4 or len(x_all) == 0:
        raise ValueError(f"images must be a non-empty uint8 (N, C, H, W) array, got {x_all.dtype} {x_all.shape}")
    device = torch.device(device)
    head = penultimate_module(surrogate)
    with torch.no_grad():
        strength = head.weight.abs().sum(0)  # per input unit: its total connection to the outputs
        chosen = torch.topk(strength, min(int(neurons), len(strength))).indices.to(device)
    feats: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))

    n = len(x_all)
    data = torch.from_numpy(x_all).to(device)
    gen = torch.Generator().manual_seed(int(seed))
    init = torch.randn(x_all.shape[1:], generator=gen, dtype=torch.float64)  # the paper's Gaussian start
    delta = (init * (0.5 * bound / init.norm())).float().to(device).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    was_training, flags = surrogate.training, [p.requires_grad for p in surrogate.parameters()]
    surrogate.eval()
    for p in surrogate.parameters():
        p.requires_grad_(False)
    try:
        every = max(1, steps // 10)
        with torch.enable_grad():
            for step in range(steps):
                idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(device)
                feats.clear()
                surrogate((data[idx].float().div(255) + delta).clamp(0, 1))
                act = feats[-1].flatten(1)[:, chosen].mean()
                loss = -act + reg * delta.norm()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    delta.copy_(project_l2(delta, bound))
                if log and ((step + 1) % every == 0 or step + 1 == steps):
                    log(f"l2_invisible step {step + 1}/{steps} activation {act.item():.4f} l2 {delta.norm().item():.4f}")
    finally:
        hook.remove()
        for p, f in zip(surrogate.parameters(), flags):
            p.requires_grad_(f)
        surrogate.train(was_training)
    t = project_l2(delta.detach().cpu().double().numpy(), bound)
    return quantize(t)
