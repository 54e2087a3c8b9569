"""PSS's backdoor removal (D-BR): unlearn the most sensitive examples, relearn the least."""
from __future__ import annotations

import numpy as np

from ..io import to_numpy
from .base import REMEDIES, Remedy, _number, select_removed


def pss_partition(scores: np.ndarray, bona_fide: np.ndarray, r_poison: float, r_clean: float) -> np.ndarray:
    """Weights -1 for the round(r_poison * N) highest scores (never a bona fide example), 1 for the
    round(r_clean * N) lowest of the rest, 0 otherwise. Ties are broken by index."""
    n = len(scores)
    poisoned = select_removed(scores, bona_fide, r_poison)
    s = np.where(poisoned, np.inf, scores)
    order = np.lexsort((np.arange(n), s))
    clean = np.zeros(n, dtype=bool)
    clean[order[:min(int(round(r_clean * n)), n - int(poisoned.sum()))]] = True
    w = np.zeros(n, dtype=np.float32)
    w[clean] = 1.0
    w[poisoned] = -1.0
    return w


@REMEDIES.register("pss_unlearn")
class PSSUnlearn(Remedy):
    """D-BR's backdoor removal as the BaDLoss paper runs it ("the unlearning method"): from a
    detector's scores (PSS's FCT), the top `r_poison` (0.05) are the distinguished poisoned set
    D_p (weight -1), the bottom `r_clean` (0.8 in BaDLoss; 0.2 in the original) the clean set D_c
    (weight 1), the rest unused (0). Starting from the attacked model (`model`), each of `epochs`
    (20) epochs is one pass of gradient ascent over D_p, then one of descent over D_c, at a constant
    `lr` (1e-4), SGD momentum 0.9, weight decay 5e-4, the dataset's augmentation. The last epoch's
    model is the result (no model selection on the test set, as BaDLoss).

    Deviations: each pass is one run of the training loop, so each starts a fresh optimiser
    (momentum does not carry over from one pass to the next); the ascent clamps each example's loss
    at `ascent_clamp` (10), so ascent stops at p(label) = e^-10 instead of inflating the logits
    without bound; bona fide examples are never put in D_p."""

    name = "pss_unlearn"
    model_param = "model"
    params = {"model": "attacked", "r_poison": 0.05, "r_clean": 0.8, "epochs": 20, "lr": 1e-4, "momentum": 0.9,
              "weight_decay": 5e-4, "ascent_clamp": 10.0}

    @classmethod
    def epochs(cls, d: dict, data: dict) -> float:
        p = {**cls.params, **d}
        return p["epochs"] * (p["r_poison"] + p["r_clean"])

    @classmethod
    def check(cls, d, key, cfg, bona) -> dict:
        from ..errors import ConfigError

        p = super().check(d, key, cfg, bona)
        _number(f"{key}.r_poison", p["r_poison"], 0, 1, True, True)
        _number(f"{key}.r_clean", p["r_clean"], 0, 1, True, True)
        if p["r_poison"] + p["r_clean"] > 1:
            raise ConfigError(f"{key}.r_clean", p["r_clean"], f"at most 1 - r_poison = {1 - p['r_poison']:g}")
        e = p["epochs"]
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ConfigError(f"{key}.epochs", e, "a positive integer")
        _number(f"{key}.lr", p["lr"], 0, float("inf"), True, True)
        _number(f"{key}.momentum", p["momentum"], 0, 1, False, True)
        _number(f"{key}.weight_decay", p["weight_decay"], 0, float("inf"), False, True)
        _number(f"{key}.ascent_clamp", p["ascent_clamp"], 0, float("inf"), True, True)
        return p

    def weights(self, scores, manifest, score_meta) -> np.ndarray:
        return pss_partition(scores, to_numpy(manifest["bona_fide"]), self.p["r_poison"], self.p["r_clean"])

    def plan_meta(self) -> dict:
        return {"ascent_clamp": float(self.p["ascent_clamp"])}

    def weight_range(self) -> tuple[float, float]:
        return -1.0, 1.0

    def train(self, job):
        poison, clean = job.weights < 0, job.weights > 0
        one_pass = {"epochs": 1, "lr": self.p["lr"], "optimizer": "sgd", "momentum": self.p["momentum"],
                    "weight_decay": self.p["weight_decay"]}
        x_p, y_p, w_p = job.images.subset(poison), job.labels[poison], job.weights[poison]
        x_c, y_c = job.images.subset(clean), job.labels[clean]
        model, res = job.model(), None
        for e in range(int(self.p["epochs"])):
            if poison.any():
                res = self._phase(job, res, x_p, y_p, f"ascent{e}", one_pass, model, weights=w_p,
                                  ascent_clamp=float(self.p["ascent_clamp"]))
                model = res.model
            res = self._phase(job, res, x_c, y_c, f"descent{e}", one_pass, model)
            model = res.model
        return res

    @staticmethod
    def _phase(job, prev, x, y, phase, training, model, **kw):
        res = job.fit(x, y, phase=phase, training=training, init_model=model, **kw)
        # Only the last pass's model is the result; drop the earlier ones so 2 x epochs passes do
        # not hold as many model copies on the device.
        if prev is not None:
            prev.model = None
        return res
