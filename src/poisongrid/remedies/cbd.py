"""CBD: Causality-inspired Backdoor Defense (Zhang et al., CVPR 2023), as the BaDLoss paper runs it."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import REMEDIES, FinalTraining, Remedy, _number

# The clean model's optimiser in CBD's code (and the BaDLoss authors', which keeps it): SGD 0.1,
# Nesterov momentum 0.9, weight decay 1e-4, the rate x0.1 at epochs 20 and 70.
REFERENCE_TRAINING = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4,
                      "schedule": "multistep", "milestones": [20, 70], "gamma": 0.1}


@REMEDIES.register("cbd")
class CBD(Remedy):
    """CBD (Zhang et al., CVPR 2023) as the BaDLoss paper runs it: a backdoored model B, trained
    on purpose for a few epochs at a constant rate (the defender model `model`, default
    `backdoored`: AdamW 1e-3, 5 epochs, `schedule: constant`), stays frozen; the final (clean)
    model C is trained from scratch on the whole poisoned set with, per batch,
    loss = mean(w * l_C) + mi_weight * MI(r, z): l_C, l_B the two models' per-example CE on the
    same augmented batch (unclamped, as the reference), w = l_B / (l_B + l_C + 1e-8) (detached)
    scaled to mean 1 per batch, and MI a critic's estimate of the dependence between B's
    penultimate features r and C's z. No example is dropped: the plan's weights are all 1.

    As the reference code: C trains with `optimizer` sgd, `lr` 0.1, `momentum` 0.9, `nesterov`,
    `weight_decay` 1e-4 and the rate x`gamma` 0.1 at the `milestones` epochs 20 and 70, for the
    dataset's epochs, batch size and augmentation (`optimizer: dataset` trains C with the
    dataset's own settings instead). Before each epoch the critic makes its own pass over the data
    (`critic_pass: epoch`: a fresh order and augmentation, C forward in train mode, one Adam step
    per batch at `critic_lr` 0.2, x0.1 every `critic_step_epochs` 20), then stays fixed during C's
    pass; after each critic step every critic parameter is divided by the square root of its
    5-iteration power estimate. `critic_pass: batch` instead steps the critic on each batch just
    before C's step (cheaper, not the reference).

    Deviations from the reference (zaixizhang/CBD, BaDLoss `defenses/cbd.py`): the critic is not
    checkpointed (a resumed final training keeps C's state but starts a fresh critic, at the
    scheduled lr of the resumed epoch); on CUDA the forward passes run in bf16 autocast.
    """

    name = "cbd"
    model_param = "model"
    graphed = False  # its per-batch objective (the critic) runs eagerly
    params = {"model": "backdoored", "mi_weight": 0.01, "critic_lr": 0.2, "critic_hidden": 0, "critic_step_epochs": 20,
              "critic_pass": "epoch", **REFERENCE_TRAINING}

    @classmethod
    def epochs(cls, d: dict, data: dict) -> float:
        # Per epoch: C's step plus B's forward on every batch; the critic pass adds C's and B's
        # forwards again (a forward about a third of a training step).
        p = {**cls.params, **d}
        return (1.35 + (0.67 if p["critic_pass"] == "epoch" else 0.0)) * data["epochs"]

    @classmethod
    def check(cls, d, key, cfg, bona) -> dict:
        from ..zoo import OPTIMIZERS, check_schedule

        p = super().check(d, key, cfg, bona)
        _number(f"{key}.mi_weight", p["mi_weight"], 0, float("inf"), False, True)
        _number(f"{key}.critic_lr", p["critic_lr"], 0, float("inf"), True, True)
        for k, lo in (("critic_hidden", 0), ("critic_step_epochs", 1)):
            v = p[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{key}.{k}", v, f"an integer >= {lo}" + (" (0: the feature width)" if k == "critic_hidden" else ""))
        if p["critic_pass"] not in ("epoch", "batch"):
            raise ConfigError(f"{key}.critic_pass", p["critic_pass"], "'epoch' (the reference) or 'batch'")
        if p["optimizer"] != "dataset":
            OPTIMIZERS.check(p["optimizer"], f"{key}.optimizer")
            _number(f"{key}.lr", p["lr"], 0, float("inf"), True, True)
            _number(f"{key}.weight_decay", p["weight_decay"], 0, float("inf"), False, True)
            _number(f"{key}.momentum", p["momentum"], 0, 1, False, True)
            check_schedule(cls.clean_training(p), key)
        return p

    @classmethod
    def budget_note(cls, d: dict) -> str | None:
        p, notes = {**cls.params, **d}, []
        if p["optimizer"] == "dataset":
            notes.append("clean model with the dataset's optimiser (reference: SGD 0.1 Nesterov, x0.1 at epochs 20, 70)")
        if p["critic_pass"] == "batch":
            notes.append("critic stepped once per batch (reference: its own pass over the data each epoch)")
        return "; ".join(notes) or None

    @staticmethod
    def clean_training(p: dict) -> dict:
        """What C's training takes from the remedy over the dataset's settings."""
        if p["optimizer"] == "dataset":
            return {}
        t = {k: p[k] for k in REFERENCE_TRAINING}
        if t["schedule"] != "multistep":
            t.pop("milestones"), t.pop("gamma")
        return t

    def weights(self, scores, manifest, score_meta) -> np.ndarray:
        return np.ones(len(manifest), dtype=np.float32)

    def plan_meta(self) -> dict:
        return {"cbd": {k: self.p[k] for k in self.params}}

    def train(self, job: FinalTraining):
        from .cbd_objective import CBDObjective

        training = {**job.training, **self.clean_training(self.p)}
        self.objective = CBDObjective(job.model(), job.images, job.labels, self.p, training, job.device, job.seed, job.log)
        try:
            return job.fit(job.images, job.labels, phase="cbd", training=training, step_loss=self.objective,
                           epoch_start=self.objective.epoch_start)
        finally:
            self.objective.close()
