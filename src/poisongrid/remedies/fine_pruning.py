"""Fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune the channels of the last conv
feature map that clean inputs leave dormant, then fine-tune on clean data."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError
from .base import REMEDIES, Remedy, _number

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported by the functions that prune and train: a fine-pruning plan job needs none of it.


def channel_activation(model: nn.Module, images, device: torch.device, image_size: int) -> np.ndarray:
    """Mean activation of each channel of the last conv feature map over `images` (eval mode, no
    augmentation): the map as the head reads it (post-activation, pooled), averaged over examples
    and positions."""
    import torch

    from ..models import conv_head
    from ..training import predict

    head, c, k = conv_head(model, image_size)
    grabbed: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda m, inp, out: grabbed.append(inp[0].float().cpu()))
    with torch.no_grad():
        try:
            predict(model, images, device)
        finally:
            hook.remove()
        return torch.cat(grabbed).view(-1, c, k).mean((0, 2)).double().numpy()


def mask_channels(model: nn.Module, channels, image_size: int) -> None:
    """Prune `channels` of the last conv feature map: a fixed zero mask on the head's input columns
    of those channels (torch.nn.utils.prune, so training cannot revive them and deep copies keep
    the mask). Cumulative with any mask already there."""
    import torch
    from torch.nn.utils import prune

    from ..models import conv_head

    head, c, k = conv_head(model, image_size)
    mask = torch.ones(c, k, device=head.weight.device)
    mask[torch.as_tensor(list(channels), dtype=torch.long)] = 0
    prune.custom_from_mask(head, "weight", mask.view(1, -1).expand_as(head.weight).clone())
    # The masked weight is recomputed at every forward; the copy left now must not hold a graph,
    # or the model cannot be deep-copied (the training loop copies the model it fine-tunes).
    head.weight = head.weight.detach()


def make_permanent(model: nn.Module, image_size: int) -> None:
    """Fold the prune mask into the weight (zeros stay zeros; a plain state dict again)."""
    from torch.nn.utils import prune

    from ..models import conv_head

    head = conv_head(model, image_size)[0]
    if prune.is_pruned(head):
        prune.remove(head, "weight")


def accuracy(model, images, labels, device) -> float:
    from ..training import predict

    return float((predict(model, images, device) == labels).mean()) if len(labels) else float("nan")


def prune_until(model: nn.Module, images, labels, device, image_size: int, order: np.ndarray, step: int,
                max_count: int, max_acc_drop: float, log=None) -> tuple[int, float, float]:
    """Prune channels in `order`, `step` at a time, up to `max_count`, as long as the accuracy on
    (images, labels) stays within a relative drop of `max_acc_drop` from the unpruned model's.
    The model ends pruned at the largest count that met the rule. Returns (count, acc0, acc)."""
    import copy

    acc0 = accuracy(model, images, labels, device)
    kept, acc_kept = 0, acc0
    for count in range(step, max_count + step, step):
        count = min(count, max_count)
        trial = copy.deepcopy(model)
        mask_channels(trial, order[:count], image_size)
        acc = accuracy(trial, images, labels, device)
        if log:
            log(f"fine-pruning: {count} channels pruned, clean accuracy {acc:.4f} (unpruned {acc0:.4f})")
        if acc0 - acc > max_acc_drop * acc0:
            break
        kept, acc_kept = count, acc
        if count == max_count:
            break
    if kept:
        mask_channels(model, order[:kept], image_size)
    return kept, acc0, acc_kept


@REMEDIES.register("fine_prune")
class FinePrune(Remedy):
    """Fine-pruning as LfD's baseline, against clean data the attacked model never saw. From the
    attacked model (`model`): rank the channels of the last conv feature map by their mean
    activation on the clean data, prune the most dormant ones `prune_step` (fraction of the
    channels, 0.01; at least one) at a time while the accuracy on that data stays within a
    relative drop of `max_acc_drop` (0.1, BackdoorBench's acc_ratio; LfD prunes "until clean
    accuracy is similar to the other baselines") of the unpruned model's, up to `prune_ratio` of
    the channels (1.0: no cap, as BackdoorBench); then fine-tune on the same clean data with
    BackdoorBench's budget: `finetune_epochs` 100 of SGD (`finetune_optimizer`) at `finetune_lr`
    0.01, momentum 0.9, weight decay 5e-4, cosine, with the dataset's augmentation and batch size
    (`finetune_optimizer: dataset`: the dataset's optimiser and weight decay). The pruned channels
    stay zero through fine-tuning and in the saved model.

    The clean data (`data`): `validation` (the default), the held-out validation split of the
    test set (top-level `validation`: 10% of it, stratified; evaluation then scores the rest of
    the test set for every defense of the dataset). `bona_fide` ranks, prunes and fine-tunes on the
    bona fide training examples instead: the attacked model has memorised them, so their accuracy
    barely drops and pruning runs to its cap (kept as an option; the tables label it).

    What is pruned: the channels of the last conv feature map as the classifier head reads it (the
    output of the last conv layer after its activation and pooling), masked where the head reads
    them (its weight columns). In a plain conv net (smallcnn, VGG, LeNet, MobileNet's last 1x1)
    that is exactly the last conv layer's ReLU'd channel; in a residual net (ResNets) it is the
    last block's output channel (layer4 in ResNet-18, as BackdoorBench and LfD prune it): zeroing
    the last conv's filters there would leave the shortcut's signal in the channel.

    The plan gives every training example weight 1: fine-pruning removes none, its final model
    descends from the attacked model trained on all of them. Deviations from BackdoorBench: it
    draws its clean data (5%) from the training set's clean copies and checks accuracy on the
    whole test set; when its loop stops it keeps the first count that broke the rule (the model and
    its last passing copy are one object), here the last count that met it; the clean data is
    ranked without augmentation. The mask is applied without physically removing the channels."""

    name = "fine_prune"
    needs_detector = False
    model_param = "model"
    params = {"model": "attacked", "data": "validation", "max_acc_drop": 0.1, "prune_ratio": 1.0, "prune_step": 0.01,
              "finetune_epochs": 100, "finetune_lr": 0.01, "finetune_optimizer": "sgd", "finetune_momentum": 0.9,
              "finetune_weight_decay": 5e-4}

    @classmethod
    def uses_validation(cls, d: dict) -> bool:
        return {**cls.params, **d}["data"] == "validation"

    @classmethod
    def budget_note(cls, d: dict) -> str | None:
        p, notes = {**cls.params, **d}, []
        if p["data"] == "bona_fide":
            notes.append("prunes against and fine-tunes on the bona fide training examples (reference: held-out clean data)")
        if p["finetune_epochs"] < cls.params["finetune_epochs"]:
            notes.append(f"fine-tunes {p['finetune_epochs']} epochs (BackdoorBench {cls.params['finetune_epochs']})")
        return "; ".join(notes) or None

    @classmethod
    def epochs(cls, d: dict, data: dict) -> float:
        # Fine-tuning on the clean data only, plus one pass over it per pruning step.
        p = {**cls.params, **d}
        n = data["n_validation"] if p["data"] == "validation" else data["n_clean"]
        return n / max(data["n_train"] or 1, 1) * (p["finetune_epochs"] + p["prune_ratio"] / p["prune_step"])

    @classmethod
    def check(cls, d, key, cfg, bona) -> dict:
        p = super().check(d, key, cfg, bona)
        _number(f"{key}.max_acc_drop", p["max_acc_drop"], 0, 1, False, True)
        _number(f"{key}.prune_ratio", p["prune_ratio"], 0, 1, True, False)
        _number(f"{key}.prune_step", p["prune_step"], 0, 1, True, False)
        e = p["finetune_epochs"]
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ConfigError(f"{key}.finetune_epochs", e, "a positive integer")
        _number(f"{key}.finetune_lr", p["finetune_lr"], 0, float("inf"), True, True)
        _number(f"{key}.finetune_momentum", p["finetune_momentum"], 0, 1, False, True)
        _number(f"{key}.finetune_weight_decay", p["finetune_weight_decay"], 0, float("inf"), False, True)
        if p["finetune_optimizer"] != "dataset":
            from ..zoo import OPTIMIZERS

            OPTIMIZERS.check(p["finetune_optimizer"], f"{key}.finetune_optimizer")
        if p["data"] not in ("validation", "bona_fide"):
            raise ConfigError(f"{key}.data", p["data"], "'validation' (held-out test images) or 'bona_fide'")
        if p["data"] == "bona_fide":
            if bona.n_clean < 1:
                raise ConfigError(f"{bona.key}.n_clean", bona.n_clean,
                                  "at least 1: fine-pruning with data: bona_fide ranks and fine-tunes on the bona fide examples")
        return p

    def weights(self, scores, manifest, score_meta) -> np.ndarray:
        return np.ones(len(manifest), dtype=np.float32)

    def clean_data(self, job):
        """The clean images and labels it prunes against and fine-tunes on."""
        if self.p["data"] == "validation":
            return job.validation()
        bona = job.bona_fide
        return job.images.subset(bona), job.labels[bona]

    def prune(self, job, x, y) -> nn.Module:
        """The attacked model with its most dormant channels pruned (a prune mask on the head)."""
        from ..models import conv_head

        size = int(job.images.shape[-1])
        model = job.model().eval()
        _, c, _ = conv_head(model, size)
        order = np.argsort(channel_activation(model, x, job.device, size), kind="stable")
        step = max(1, math.ceil(self.p["prune_step"] * c))
        max_count = int(math.floor(self.p["prune_ratio"] * c))
        count, acc0, acc = prune_until(model, x, y, job.device, size, order, step, max_count, self.p["max_acc_drop"],
                                       job.log)
        self.pruned = order[:count].tolist()
        self.accuracy = (acc0, acc)
        if job.log:
            job.log(f"fine-pruning: pruned {count} of {c} channels, {self.p['data']} accuracy {acc0:.4f} -> {acc:.4f}")
        return model

    def finetune_training(self) -> dict:
        t = {"epochs": self.p["finetune_epochs"], "lr": self.p["finetune_lr"]}
        if self.p["finetune_optimizer"] != "dataset":
            t.update(optimizer=self.p["finetune_optimizer"], momentum=self.p["finetune_momentum"],
                     weight_decay=self.p["finetune_weight_decay"], schedule="cosine", nesterov=False)
        return t

    def train(self, job):
        size = int(job.images.shape[-1])
        x, y = self.clean_data(job)
        model = self.prune(job, x, y)
        res = job.fit(x, y, phase="finetune", init_model=model, training=self.finetune_training())
        make_permanent(res.model, size)
        return res
