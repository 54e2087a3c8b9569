"""Remedies: turn a detector's scores into a plan of per-example weights for the final training.

weight 1 = train on it as usual, 0 = drop it, < 0 = gradient ascent with that weight. Removal is
the special case of weights in {0, 1}. A remedy sees the defender's view of the manifest (`index`,
`label`, `bona_fide`), except the `oracle` reference, which is marked `ground_truth` and drops
exactly the poisoned examples: it is no defense but the floor any filtering defense could reach
(it shows, e.g., how much of a boosted trigger's ASR is natural transfer rather than a learned
backdoor)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from .errors import ConfigError
from .registry import Registry

REMEDIES: Registry = Registry("remedy")


def select_removed(scores: np.ndarray, bona_fide: np.ndarray, r_reject: float) -> np.ndarray:
    """Boolean mask of the round(r * N) highest-scoring examples, never a bona fide one.
    Ties are broken by index, so the result does not depend on the sort's stability."""
    n = len(scores)
    n_remove = min(int(round(r_reject * n)), int((~bona_fide).sum()))
    s = np.where(bona_fide, -np.inf, scores)
    order = np.lexsort((np.arange(n), -s))
    out = np.zeros(n, dtype=bool)
    out[order[:n_remove]] = True
    return out


def _number(key: str, v, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok:
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        raise ConfigError(key, v, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
    return float(v)


@dataclass
class FinalTraining:
    """What a remedy's final training may use: the dataset's training settings, the poisoned
    training set as the defender sees it (images, labels as trained on, bona fide mask), the plan's
    weights and metadata, and the defender model the remedy names (`model()`), if any."""

    training: dict
    images: Any
    labels: np.ndarray
    weights: np.ndarray
    bona_fide: np.ndarray
    num_classes: int
    seed: int
    device: Any
    plan_meta: dict
    checkpoint: str | None = None
    fingerprint: str = ""
    log: Callable[[str], None] | None = None
    load_model: Callable[[], Any] | None = None
    phases: list = field(default_factory=list)

    def fit(self, images, labels, phase: str = "train", training: dict | None = None, **kw):
        """One run of the training loop with the dataset's settings (overridden by `training`);
        each phase of a remedy checkpoints on its own."""
        from .training import fit

        res = fit({**self.training, **(training or {})}, images, labels, self.num_classes, seed=self.seed,
                  device=self.device, checkpoint=f"{self.checkpoint}.{phase}" if self.checkpoint else None,
                  fingerprint=f"{self.fingerprint}:{phase}", log=self.log, **kw)
        self.phases.append((phase, res))
        return res

    def model(self):
        if self.load_model is None:
            raise ValueError("this remedy names no defender model")
        return self.load_model()


class Remedy:
    """`params`: name -> default; `needs_detector`: reads a detector's scores; `ground_truth`: a
    reference that reads the manifest's ground truth (never a real defense). `model_param`: the
    parameter naming the defender model the final training reads (None: it reads none).
    `cost_epochs`: what the final training costs beyond the dataset's epochs, in epochs."""

    name: ClassVar[str]
    params: ClassVar[dict] = {}
    needs_detector: ClassVar[bool] = True
    ground_truth: ClassVar[bool] = False
    model_param: ClassVar[str | None] = None

    @classmethod
    def reads_model(cls, d: dict) -> str | None:
        """The defender model a defense entry's final training reads."""
        return d.get(cls.model_param, cls.params.get(cls.model_param)) if cls.model_param else None

    def __init__(self, **params):
        self.p = {**self.params, **params}

    @classmethod
    def check(cls, d: dict, key: str, cfg: dict) -> dict:
        """Check a defense entry's remedy parameters; return them with defaults filled in."""
        from .config import WHERE_KEYS

        allowed = set(cls.params) | {"remedy", *WHERE_KEYS} | ({"detector"} if cls.needs_detector else set())
        for k in d:
            if k not in allowed:
                raise ConfigError(f"{key}.{k}", d[k], f"one of {sorted(allowed - {'remedy'})} for remedy '{cls.name}'")
        if cls.needs_detector:
            dets = sorted(cfg["detectors"])
            if d.get("detector") not in cfg["detectors"]:
                raise ConfigError(f"{key}.detector", d.get("detector"), f"one of the configured detectors {dets}")
        model = cls.reads_model(d)
        if cls.model_param and model not in cfg["defender_models"]:
            raise ConfigError(f"{key}.{cls.model_param}", model, f"one of the defender models {sorted(cfg['defender_models'])}")
        return {**cls.params, **{k: v for k, v in d.items() if k in cls.params}}

    def weights(self, scores: np.ndarray, manifest, score_meta: dict) -> np.ndarray:
        raise NotImplementedError

    def plan_meta(self) -> dict:
        """What the final training must know besides the weights."""
        return {}

    def train(self, job: FinalTraining):
        """The final model: by default trained from scratch on the weighted loss, weight-0
        examples left out. Returns the training loop's result (its model is the final model)."""
        keep = job.weights != 0
        return job.fit(job.images.subset(keep), job.labels[keep], weights=job.weights[keep],
                       ascent_clamp=job.plan_meta.get("ascent_clamp"))


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
    def check(cls, d, key, cfg) -> dict:
        p = super().check(d, key, cfg)
        _number(f"{key}.r_reject", p["r_reject"], 0, 1, False, True)
        return p

    def weights(self, scores, manifest, score_meta) -> np.ndarray:
        removed = select_removed(scores, manifest["bona_fide"].to_numpy(), self.p["r_reject"])
        return (~removed).astype(np.float32)


@REMEDIES.register("oracle")
class Oracle(Remedy):
    name = "oracle"
    needs_detector = False
    ground_truth = True

    def weights(self, scores, manifest, score_meta) -> np.ndarray:
        return manifest["attack"].isna().to_numpy().astype(np.float32)


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
    def check(cls, d, key, cfg) -> dict:
        p = super().check(d, key, cfg)
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
