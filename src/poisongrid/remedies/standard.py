"""Remedies: turn a detector's scores into a plan of per-example weights for the final training.

weight 1 = train on it as usual, 0 = drop it, < 0 = gradient ascent with that weight. Removal is
the special case of weights in {0, 1}. A remedy sees the defender's view of the manifest (`index`,
`label`, `bona_fide`), except the `oracle` reference, which is marked `ground_truth` and drops
exactly the poisoned examples: it is no defense but the floor any filtering defense could reach
(it shows, e.g., how much of a boosted trigger's ASR is natural transfer rather than a learned
backdoor)."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..io import to_numpy
from .base import REMEDIES, Remedy, _number, select_removed


@REMEDIES.register("none")
class NoRemedy(Remedy):
    name = "none"
    needs_detector = False

    def weights(self, scores, manifest, score_meta) -> np.ndarray:
        return np.ones(len(manifest), dtype=np.float32)


@REMEDIES.register("remove")
class Remove(Remedy):
    """Drop the r_reject fraction with the highest scores (never a bona fide example); retrain."""

    name = "remove"
    params = {"r_reject": 0.4}

    @classmethod
    def check(cls, d, key, cfg, bona) -> dict:
        p = super().check(d, key, cfg, bona)
        _number(f"{key}.r_reject", p["r_reject"], 0, 1, False, True)
        return p

    def weights(self, scores, manifest, score_meta) -> np.ndarray:
        removed = select_removed(scores, to_numpy(manifest["bona_fide"]), self.p["r_reject"])
        return (~removed).astype(np.float32)


@REMEDIES.register("oracle")
class Oracle(Remedy):
    name = "oracle"
    needs_detector = False
    ground_truth = True

    def weights(self, scores, manifest, score_meta) -> np.ndarray:
        attack = manifest["attack"]
        clean = attack.is_null() if hasattr(attack, "is_null") else attack.isna()  # an Arrow table or a DataFrame
        return to_numpy(clean).astype(np.float32)


def lfd_weights(loss: np.ndarray, alpha: float, beta: float, mode: str = "weighted") -> np.ndarray:
    """LfD's weights from each example's teacher loss (Eq. 4-6, Algorithm 1).

    gamma = the loss at position floor(n * alpha) of the ascending sort (Eq. 4). weighted (Eq. 6):
    w = l / max(l) above gamma; w = beta * (l - gamma) / (max(l) - gamma) <= 0 at or below it.
    ascent (Eq. 5, plain gradient ascent): the batch mean of w * l equals E_non-candidate[l] -
    E_candidate[l], so w = 1 / (1 - alpha) above gamma and -1 / alpha at or below it."""
    loss = np.asarray(loss, dtype=np.float64)
    n = len(loss)
    gamma = np.sort(loss)[min(int(n * alpha), n - 1)]
    cand = loss <= gamma
    top = loss.max()
    if mode == "weighted":
        span = top - gamma
        w = np.where(cand, beta * (loss - gamma) / span if span > 0 else 0.0, loss / top if top > 0 else 1.0)
    elif mode == "ascent":
        frac = cand.mean()
        w = np.where(cand, -1.0 / frac, 1.0 / (1.0 - frac) if frac < 1 else 0.0)
    else:
        raise ValueError(f"mode {mode!r}: 'weighted' or 'ascent'")
    return w.astype(np.float32)


@REMEDIES.register("reweight")
class Reweight(Remedy):
    """LfD's remedy: signed per-example weights from a loss-like quantity (Eq. 4-6).

    From a detector whose scores are negated losses (LfD's teacher loss) the loss is -score,
    exactly the paper's; from any other detector (e.g. BaDLoss) it is max(score) - score, a
    nonnegative quantity that is small for the most suspicious examples, as the loss is. An
    example whose weight is exactly 0 (the gamma example itself) is dropped. `ascent_clamp`: the
    final training clamps the loss of negative-weight examples there, so gradient ascent stops at
    p(label) = e^-clamp rather than inflating the logits without bound."""

    name = "reweight"
    params = {"alpha": 0.15, "beta": 1e-3, "mode": "weighted", "ascent_clamp": 10.0}

    @classmethod
    def check(cls, d, key, cfg, bona) -> dict:
        p = super().check(d, key, cfg, bona)
        _number(f"{key}.alpha", p["alpha"], 0, 1, True, True)
        _number(f"{key}.beta", p["beta"], 0, 1, True, False)
        _number(f"{key}.ascent_clamp", p["ascent_clamp"], 0, float("inf"), True, True)
        if p["mode"] not in ("weighted", "ascent"):
            raise ConfigError(f"{key}.mode", p["mode"], "'weighted' (Eq. 6) or 'ascent' (plain gradient ascent, Eq. 5)")
        return p

    def weights(self, scores, manifest, score_meta) -> np.ndarray:
        loss = -scores if score_meta.get("negated_loss") else scores.max() - scores
        # As the paper: the bona fide examples are weighted like any other (LfD knows none).
        return lfd_weights(loss, self.p["alpha"], self.p["beta"], self.p["mode"])

    def plan_meta(self) -> dict:
        return {"ascent_clamp": float(self.p["ascent_clamp"])}

    def weight_range(self) -> tuple[float, float]:
        if self.p["mode"] == "ascent":
            # Eq. 5's weights: -1 / (share of candidates) and 1 / (1 - share), the share at least 1/N.
            return float("-inf"), float("inf")
        # Eq. 6: l / max l <= 1 above gamma; beta (l - gamma) / (max l - gamma) at or below it, which
        # falls below -beta wherever gamma exceeds half the largest loss: no fixed lower bound.
        return float("-inf"), 1.0
