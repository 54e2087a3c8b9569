"""CBD's training objective (torch): the per-batch weights, the mutual-information critic with its
own pass over the data before each epoch, and the loss the final training minimises. The remedy
itself (remedies/cbd.py) imports it when it trains, so a CBD plan job never imports torch."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CRITIC_DROPOUT = 0.2  # the original's DisenEstimator(d, d, dropout=0.2)
POWER_ITERATIONS = 5  # the original's spectral_norm(W, n_iteration=5)


def cbd_weights(loss_b: torch.Tensor, loss_c: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """CBD's per-example weights of one batch: w = l_B / (l_B + l_C + eps), scaled to mean 1.

    An example the backdoored model fits far better than the clean one (low l_B, the backdoor
    path) gets a small weight. A batch whose weights are all 0 (l_B == 0 everywhere) is weighted
    uniformly rather than divided by zero."""
    w = (loss_b / (loss_b + loss_c + eps)).detach()
    total = w.sum()
    return w * (len(w) / total) if total > 0 else torch.ones_like(w)


@torch.no_grad()
def power_norm(w: torch.Tensor, iterations: int = POWER_ITERATIONS) -> torch.Tensor:
    """The square root of the power-iteration estimate of a weight's largest singular value (a
    bias counts as one column), from a start of ones, as CBD's code computes what it divides by."""
    m = w.reshape(w.shape[0], -1) if w.dim() > 1 else w[:, None]
    u = torch.ones(1, m.shape[1], device=w.device, dtype=w.dtype)
    v = u @ m.T
    for _ in range(iterations):
        v = u @ m.T
        v = v / v.norm()
        u = v @ m
        u = u / u.norm()
    return ((u @ m.T) @ v.T).sum().sqrt()


class MICritic(nn.Module):
    """CBD's mutual-information critic: a 2-layer MLP (dropout, leaky ReLU) on the concatenated
    features [r, z]. Its estimate is the mean score of the joint pairs (r_i, z_i) minus that of the
    product of the marginals (r_i, z_{i+1}), a Wasserstein-style dependence measure: the critic
    maximises it, the clean model minimises it. After each of its steps `lipschitz_()` divides
    every parameter, biases too, by power_norm (CBD's code; not an exact normalisation, it pulls
    each norm towards 1 over many steps)."""

    def __init__(self, dim_r: int, dim_z: int, hidden: int, dropout: float = CRITIC_DROPOUT):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(dim_r + dim_z, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def score(self, r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.fc1(self.drop(torch.cat([r, z], 1))))
        return self.fc2(self.drop(h)).squeeze(-1)

    def forward(self, r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.score(r, z).mean() - self.score(r, z.roll(-1, 0)).mean()

    @torch.no_grad()
    def lipschitz_(self) -> None:
        for q in self.parameters():
            q.div_(power_norm(q))


def _grab_input(store: dict, key: str):
    def hook(module, inp, out):
        store[key] = inp[0]
    return hook


class CBDObjective:
    """The clean model's batch loss under CBD, with the frozen backdoored model B and the critic.
    Passed to fit as step_loss; its epoch_start first runs the critic's own pass over the data (a
    fresh order and augmentation, the clean model forward in train mode as the reference's loop
    runs it, one critic step per batch), then freezes the critic for the clean model's pass."""

    def __init__(self, backdoored: nn.Module, images, labels: np.ndarray, p: dict, training: dict,
                 device: torch.device, seed: int, log=None):
        from ..models import penultimate_module

        self.p, self.device, self.seed, self.log = p, device, seed, log
        self.images, self.labels = images, torch.as_tensor(np.array(labels), dtype=torch.int64)
        self.training = training
        self.amp = device.type == "cuda" and training.get("precision", "bf16") == "bf16"
        self.b = backdoored.eval()
        for q in self.b.parameters():
            q.requires_grad_(False)
        self.feats: dict = {}
        self.hooks = [penultimate_module(self.b).register_forward_hook(_grab_input(self.feats, "r"))]
        self.dim_r = penultimate_module(self.b).in_features
        self.model = None
        self.critic: MICritic | None = None
        self.opt: torch.optim.Optimizer | None = None
        n = len(self.labels)
        # Each example's weights summed over the epochs (for inspection: CBD's implicit detection).
        self.weight_sum = torch.zeros(n, device=device)
        self.weight_count = torch.zeros(n, device=device)
        self.critic_steps = 0
        self._mi_sum, self._batches = 0.0, 0

    def mi(self, r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The weighted estimate the clean model adds to its loss (the reference: 0.01 x)."""
        return float(self.p["mi_weight"]) * self.critic(r, z)

    def epoch_start(self, epoch: int, model: nn.Module) -> None:
        from ..models import penultimate_module

        if model is not self.model:
            # First epoch of this run (also after a resume: the critic starts afresh then).
            self.model = model
            self.hooks.append(penultimate_module(model).register_forward_hook(_grab_input(self.feats, "z")))
            dim_z = penultimate_module(model).in_features
            hidden = int(self.p["critic_hidden"]) or dim_z
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 7919)
                self.critic = MICritic(self.dim_r, dim_z, hidden).to(self.device)
            self.opt = torch.optim.Adam(self.critic.parameters(), lr=float(self.p["critic_lr"]))
        elif self.log and self._batches:
            self.log(f"cbd: epoch {epoch} mean MI estimate {self._mi_sum / self._batches:.4g}")
        # StepLR(critic_step_epochs, 0.1), stepped after each epoch in the reference.
        for g in self.opt.param_groups:
            g["lr"] = float(self.p["critic_lr"]) * 0.1 ** (epoch // int(self.p["critic_step_epochs"]))
        self.critic.train()
        if self.p["critic_pass"] == "epoch":
            self.critic_pass(epoch, model)
        self.critic.requires_grad_(self.p["critic_pass"] == "batch")
        self._mi_sum, self._batches = 0.0, 0

    def critic_pass(self, epoch: int, model: nn.Module) -> None:
        """One pass over the training set that trains only the critic."""
        from ..training import AUGMENTS, as_tensor_data, channels_last, gather_batch, to_float

        augment = AUGMENTS.get(self.training.get("augment", "none"), "augment")
        if not isinstance(self.images, torch.Tensor):
            self.images = as_tensor_data(self.images, self.device)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, 4099, epoch]).generate_state(1)[0]))
        n, bs = len(self.labels), int(self.training.get("batch_size", 128))
        cl = channels_last(self.device)
        was = model.training
        model.train()
        self.critic.requires_grad_(True)
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            x = to_float(augment(gather_batch(self.images, idx, self.device), gen, self.training), cl)
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                model(x)
                self.b(x)
            z, r = self.feats.pop("z").float(), self.feats.pop("r").float()
            self.critic_step(r, z)
        model.train(was)

    def backdoored_pass(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B's per-example loss and penultimate features on the batch (no gradient)."""
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.b(x)
        return F.cross_entropy(logits.float(), y, reduction="none"), self.feats.pop("r").float()

    def critic_step(self, r: torch.Tensor, z: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        (-self.mi(r, z)).backward()
        self.opt.step()
        self.critic.lipschitz_()
        self.critic_steps += 1

    def __call__(self, model, x, y, per_example_ce, idx) -> torch.Tensor:
        z = self.feats.pop("z", None)
        if z is None or z.shape[0] != len(y):
            raise RuntimeError("CBD: the clean model's features of this batch were not captured (epoch_start not called)")
        z = z.float()
        loss_b, r = self.backdoored_pass(x, y)
        w = cbd_weights(loss_b, per_example_ce.detach())
        i = idx.to(self.device)
        self.weight_sum[i] += w
        self.weight_count[i] += 1
        if self.p["critic_pass"] == "batch":  # the critic's step on this very batch, then the clean model's
            self.critic_step(r, z.detach())
        mi = self.mi(r, z)
        self._mi_sum += float(mi.detach())
        self._batches += 1
        return (w * per_example_ce).mean() + mi

    def mean_weight(self) -> np.ndarray:
        """Each example's weight averaged over the epochs it was trained in this run."""
        return (self.weight_sum / self.weight_count.clamp(min=1)).cpu().numpy()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
