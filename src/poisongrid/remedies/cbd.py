"""CBD: Causality-inspired Backdoor Defense (Zhang et al., CVPR 2023), as the BaDLoss paper runs it."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import REMEDIES, FinalTraining, Remedy, _number


@REMEDIES.register("cbd")
class CBD(Remedy):
    """CBD (Zhang et al., CVPR 2023) as the BaDLoss paper runs it: a backdoored model B, trained
    on purpose for a few epochs (the defender model `model`, default `backdoored`), stays frozen;
    the final (clean) model is trained from scratch on the whole poisoned set with, per batch,
    loss = mean(w * l_C) + mi_weight * MI(r, z): l_C, l_B the two models' per-example CE on the
    same augmented batch, w = l_B / (l_B + l_C + 1e-8) (detached) scaled to mean 1 per batch, and
    MI a critic's estimate of the dependence between B's penultimate features r and the clean
    model's z. No example is dropped: the plan's weights are all 1.

    Deviations from the original (zaixizhang/CBD, BaDLoss `defenses/cbd.py`):
    - The clean model trains with the dataset's settings (optimiser, lr, cosine schedule, epochs,
      augmentation); the original uses SGD lr 0.1 nesterov, steps at epochs 20 and 70.
    - The critic takes one Adam step per batch, just before the clean model's step on the same
      batch, instead of a separate full pass over the data before each epoch. Its lr is divided
      by 10 every `critic_step_epochs` epochs (the original's StepLR(20, 0.1)).
    - The critic is Lipschitz-bounded with torch's spectral normalisation of its two weight
      matrices; the original divides every parameter (biases too) by the square root of a
      5-iteration power estimate after each step.
    - `mi_weight` multiplies the critic's plain estimate; the original scales the estimate by
      0.01 inside the estimator and adds it with weight 1 (same effective 0.01).
    - The critic is not checkpointed: a resumed final training keeps the clean model's state but
      starts a fresh critic (at the scheduled lr of the resumed epoch).
    """

    name = "cbd"
    model_param = "model"
    graphed = False  # its per-batch objective (the critic) runs eagerly
    params = {"model": "backdoored", "mi_weight": 0.01, "critic_lr": 0.2, "critic_hidden": 0, "critic_step_epochs": 20}

    @classmethod
    def epochs(cls, d: dict, data: dict) -> float:
        # B's forward on every batch and the critic's step: about a third of an epoch per epoch.
        return 1.35 * data["epochs"]

    @classmethod
    def check(cls, d, key, cfg) -> dict:
        p = super().check(d, key, cfg)
        _number(f"{key}.mi_weight", p["mi_weight"], 0, float("inf"), False, True)
        _number(f"{key}.critic_lr", p["critic_lr"], 0, float("inf"), True, True)
        for k, lo in (("critic_hidden", 0), ("critic_step_epochs", 1)):
            v = p[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{key}.{k}", v, f"an integer >= {lo}" + (" (0: the feature width)" if k == "critic_hidden" else ""))
        return p

    def weights(self, scores, manifest, score_meta) -> np.ndarray:
        return np.ones(len(manifest), dtype=np.float32)

    def plan_meta(self) -> dict:
        return {"cbd": {k: self.p[k] for k in self.params}}

    def train(self, job: FinalTraining):
        from .cbd_objective import CBDObjective

        self.objective = CBDObjective(job.model(), len(job.labels), self.p, job.training, job.device, job.seed, job.log)
        try:
            return job.fit(job.images, job.labels, phase="cbd", step_loss=self.objective,
                           epoch_start=self.objective.epoch_start)
        finally:
            self.objective.close()
