"""PSS: poisoned samples' features are sensitive to strong transformations (Chen, Wu & Wang 2022)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import DETECTORS, Detector, ScoreWriter


def intraclass_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The paper's L_intra: the class centres of the batch (mean feature of each class present),
    L2-normalised; the mean of their cosine-similarity matrix with its diagonal zeroed (the mean
    runs over all K' x K' entries, diagonal included). Minimising it pulls the class centres apart."""
    classes, inv = labels.unique(return_inverse=True)
    feats = features.float().flatten(1)
    sums = torch.zeros(len(classes), feats.shape[1], device=feats.device, dtype=feats.dtype).index_add(0, inv, feats)
    counts = torch.bincount(inv, minlength=len(classes)).to(feats.dtype)
    centres = F.normalize(sums / counts[:, None], dim=1)
    sim = centres @ centres.T
    off = 1.0 - torch.eye(len(classes), device=feats.device, dtype=feats.dtype)
    return (sim * off).mean()


class _FeatureTap(nn.Module):
    """Wraps a model so each forward keeps the penultimate feature of the batch (the input of
    its last Linear), for a step loss that needs the features of the training loop's own pass."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.features: torch.Tensor | None = None

    def forward(self, x):
        from ..models import penultimate_module

        grabbed: list[torch.Tensor] = []
        hook = penultimate_module(self.net).register_forward_hook(lambda m, inp, out: grabbed.append(inp[0]))
        try:
            out = self.net(x)
        finally:
            hook.remove()
        self.features = grabbed[-1]
        return out


def strong_transform(x: torch.Tensor, gen: torch.Generator, degrees: float, translate: float) -> torch.Tensor:
    """Per image: a random rotation in [-degrees, degrees] about the centre, then a random shift of
    up to `translate` of the width/height (whole pixels), nearest neighbour, zero fill (torchvision's
    RandomRotation then RandomAffine(0, translate) defaults). x: float (N, C, H, W)."""
    n, _, h, w = x.shape
    angle = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * math.radians(degrees)
    tx = torch.round((torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * translate * w) * 2 / w
    ty = torch.round((torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * translate * h) * 2 / h
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output to input coordinates: in = R^-1 (out - t).
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, sin, -sin, cos
    theta[:, 0, 2] = -(cos * tx + sin * ty)
    theta[:, 1, 2] = -(-sin * tx + cos * ty)
    grid = F.affine_grid(theta.to(x.device, torch.float32), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def feature_change(model: nn.Module, images, device: torch.device, gen: torch.Generator, degrees: float,
                   translate: float, batch_size: int = 512) -> np.ndarray:
    """FCT of every example: mean over feature dimensions of (f(x) - f(tau(x)))^2, f the
    penultimate feature in eval mode, tau a seeded strong transformation."""
    from ..models import penultimate_module
    from ..training import as_tensor_data, channels_last, gather_batch, to_float

    model.eval()
    images = as_tensor_data(images, device)
    cl = channels_last(device)
    grabbed: list[torch.Tensor] = []
    hook = penultimate_module(model).register_forward_hook(lambda m, inp, out: grabbed.append(inp[0].float()))
    out = np.empty(len(images), dtype=np.float64)
    try:
        for s in range(0, len(images), batch_size):
            idx = torch.arange(s, min(s + batch_size, len(images)))
            x = to_float(gather_batch(images, idx, device), cl)
            grabbed.clear()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(x)
                model(strong_transform(x, gen, degrees, translate))
            a, b = grabbed
            out[s:s + len(idx)] = ((a - b) ** 2).flatten(1).mean(1).double().cpu().numpy()
    finally:
        hook.remove()
    return out


@DETECTORS.register("pss")
class PSS(Detector):
    """Poisoned Sample Sensitivity (Chen, Wu & Wang, NeurIPS 2022; the Sample-Distinguishment
    module of D-BR/D-ST) as the BaDLoss paper runs it: a model trained briefly without augmentation
    (the defender model `model`, default `pss_warmup`: 2 epochs, no augmentation) is fine-tuned
    for `intraclass_epochs` (3) with the intra-class loss alone (no cross-entropy; SGD, `lr` 0.01,
    momentum 0.9, `weight_decay` 5e-4, cosine over `schedule_epochs` 100 of which only the
    intra-class epochs run, no augmentation); score = the change of each example's penultimate
    feature under a random rotation (up to `degrees` 180) then translation (up to `translate` 0.2),
    FCT. Poisoned examples' features are the more sensitive: higher = more suspicious.

    Deviations: the transformation is drawn per image (as the original; the BaDLoss code draws one
    per batch) and applied on the float image (nearest neighbour, zero fill) rather than the PIL
    image; one draw per example, seeded from the cell's seed. The fine-tuning runs through the
    training loop, which starts a fresh optimiser (the original carries over the warm-up's SGD state)."""

    type = "pss"
    needs = ("weights", "images")
    default_model = "pss_warmup"
    gpu = True
    cost_epochs = 5.0  # 3 intra-class epochs + two forward passes, with margin
    params = {"intraclass_epochs": 3, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "schedule_epochs": 100,
              "degrees": 180.0, "translate": 0.2}

    @classmethod
    def check(cls, det: dict, key: str, cfg: dict, bona) -> None:
        super().check(det, key, cfg, bona)
        p = {**cls.params, **det}
        cls.positive(f"{key}.intraclass_epochs", p["intraclass_epochs"], integer=True)
        cls.positive(f"{key}.schedule_epochs", p["schedule_epochs"], integer=True)
        if p["schedule_epochs"] < p["intraclass_epochs"]:
            raise ConfigError(f"{key}.schedule_epochs", p["schedule_epochs"], f"at least intraclass_epochs ({p['intraclass_epochs']})")
        cls.positive(f"{key}.lr", p["lr"])
        cls.positive(f"{key}.degrees", p["degrees"], upper=180)
        for k, hi in (("momentum", 1.0), ("weight_decay", float("inf")), ("translate", 1.0)):
            if not 0 <= p[k] < hi:
                raise ConfigError(f"{key}.{k}", p[k], f"a number in [0, {hi:g})")

    def finetune(self) -> nn.Module:
        """The warm-up model after the intra-class epochs."""
        from ..training import fit

        view = self.view
        training = {**view.training, "optimizer": "sgd", "lr": self.p["lr"], "momentum": self.p["momentum"],
                    "weight_decay": self.p["weight_decay"], "epochs": self.p["schedule_epochs"], "augment": "none"}

        def step_loss(model, x, y, per_example_ce, idx):
            return intraclass_loss(model.features, y)

        res = fit(training, view.images, view.labels, view.num_classes, seed=view.seed, device=view.device,
                  epochs_to_run=self.p["intraclass_epochs"], init_model=_FeatureTap(view.model()), step_loss=step_loss,
                  log=view.log)
        self.train_loss = res.train_loss
        return res.model.net

    def score(self, out_path) -> dict:
        view = self.view
        model = self.finetune()
        fct = feature_change(model, view.images, view.device, view.generator(7), float(self.p["degrees"]),
                             float(self.p["translate"]))
        meta = {"cell": self.cell, "detector": self.type, "params": self.p, "intraclass_loss": self.train_loss,
                "fct_quantiles": np.quantile(fct, [0.05, 0.2, 0.5, 0.8, 0.95]).tolist()}
        with ScoreWriter(out_path, meta, self.view) as w:
            w.write(view.index, fct)
        return meta
