"""An adaptive blend attack against BaDLoss (Alex et al., ICLR 2025, Appendix D): the attacker
picks the blend strength whose poisoned loss trajectories look most like clean ones."""
from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError
from .base import ATTACKS, Attack, LearnJob, _short

CRITERIA = ("knn_auroc", "mean_gap")
RECORDS = ("eval", "train")


@ATTACKS.register("adaptive_blend")
class AdaptiveBlend(Attack):
    """x' = alpha p + (1 - alpha) x with a uniform random pattern p (each value k/255, as
    blend_random) and the label flipped to the target; alpha is learned by the `trigger` stage.
    Boost (ASR): alpha -> min(2 alpha, 1), as the other blends.

    Appendix D of the BaDLoss paper proposes, as the simpler adaptive attack, to "adjust the attack
    strength such that the loss of each backdoor sample equals the average loss of the clean samples
    at every epoch". In a data-poisoning threat model the attacker never sees the defender's
    training, so it cannot adjust anything per epoch: the poisoned images are fixed before training
    starts. This attack realises the idea with the attacker's own surrogate training instead:

    1. the attacker holds `pool_fraction` of the clean training set; `poison_ratio` of it (default:
       the attack's own `ratio`) is poisoned, images drawn from the non-target classes;
    2. for every strength in `alphas`, a fresh surrogate (`model`, `epochs`, augmentation `augment`,
       by default none as in BaDLoss's pretraining) is trained on that poisoned pool with the
       training loop, recording every example's loss each epoch (`record`: 'eval', the paper's
       extra eval-mode pass, or 'train', the training pass's own losses); epochs with loss spikes
       are dropped by the paper's rule, as the defender's pretraining does;
    3. `n_reference` clean pool examples play the defender's bona fide set; every other example is
       scored as BaDLoss scores it, log of the mean distance of its trajectory to its `k` nearest
       reference trajectories (log-losses first with `log_losses`), and the surrogate's detection
       AUROC (poisoned vs the remaining clean examples) is measured; `mean_gap` is the paper's
       literal target, the mean over epochs of |mean poisoned loss - mean clean loss|;
    4. the surrogate's ASR (test images outside the target class, trigger at that strength, not
       boosted) and clean test accuracy are measured;
    5. the chosen alpha minimises `criterion` ('knn_auroc' or 'mean_gap') among the strengths whose
       ASR is at least `min_asr`. If none reaches it, the alpha with the highest ASR is taken, the
       log says so and the artifact's `met_min_asr` is false.

    The artifact holds `alpha`, the `pattern` (uint8, so poisoning and test time use the very
    pattern the surrogate saw) and, per strength of `alphas`, `asr`, `clean_acc`, `knn_auroc`,
    `mean_gap` and the mean poisoned and clean trajectories (`poison_traj`, `clean_traj`), so the
    trade-off can be inspected.

    Design choices and limits: one surrogate run per strength (len(alphas) x epochs of training),
    not one run holding every strength, because the strong copies would install the backdoor and
    make the weak ones look learned; one strength for all poisoned images, not one per image,
    because an image's trajectory depends on the strength of all the others and the rows the
    poison stage picks are not known to the learning step; the surrogate stands in for the
    defender's model, so the AUROC and ASR it predicts are estimates from one seed. The bi-level
    variant (optimising the trigger itself through training) is not implemented."""

    name = "adaptive_blend"
    boostable = True
    defaults: dict = {}
    # poison_ratio None: the attack's ratio; min_asr may be 0 (no constraint).
    learn_defaults = {"model": "resnet18", "epochs": 10, "pool_fraction": 1.0, "alphas": [0.02, 0.05, 0.1, 0.2],
                      "min_asr": 0.9, "poison_ratio": None, "n_reference": 250, "k": 50, "log_losses": False,
                      "record": "eval", "augment": "none", "criterion": "knn_auroc"}

    @classmethod
    def check_learn(cls, settings: dict, key: str, deep: bool = True) -> dict:
        if not isinstance(settings, dict):
            return super().check_learn(settings, key, deep)
        special = {k: settings[k] for k in ("alphas", "min_asr", "poison_ratio") if k in settings}
        s = super().check_learn({k: v for k, v in settings.items() if k not in special}, key, deep)
        alphas = special.get("alphas", s["alphas"])
        if not isinstance(alphas, (list, tuple)) or not alphas or not all(_is_number(a) and 0 < a <= 1 for a in alphas) \
                or len(set(alphas)) != len(alphas):
            raise ConfigError(f"{key}.alphas", alphas, "a non-empty list of distinct numbers in (0, 1]")
        m = special.get("min_asr", s["min_asr"])
        if not (_is_number(m) and 0 <= m <= 1):
            raise ConfigError(f"{key}.min_asr", m, "a number in [0, 1] (0: no ASR constraint)")
        r = special.get("poison_ratio", s["poison_ratio"])
        if r is not None and not (_is_number(r) and 0 < r < 1):
            raise ConfigError(f"{key}.poison_ratio", r, "a number in (0, 1), or null for the attack's ratio")
        if s["record"] not in RECORDS:
            raise ConfigError(f"{key}.record", s["record"], f"one of {list(RECORDS)}")
        if s["criterion"] not in CRITERIA:
            raise ConfigError(f"{key}.criterion", s["criterion"], f"one of {list(CRITERIA)}")
        if deep:
            from ..zoo import AUGMENTS

            AUGMENTS.check(s["augment"], f"{key}.augment")
        return {**s, "alphas": [float(a) for a in alphas], "min_asr": float(m),
                "poison_ratio": None if r is None else float(r)}

    @classmethod
    def learn_epochs(cls, settings: dict) -> float:
        """One surrogate per strength on `pool_fraction` of the set (an eval pass adds a third)."""
        s = {**cls.learn_defaults, **settings}
        per_epoch = 4 / 3 if s["record"] == "eval" else 1.0
        return len(s["alphas"]) * float(s["epochs"]) * float(s["pool_fraction"]) * per_epoch

    @classmethod
    def learn(cls, job: LearnJob) -> dict[str, np.ndarray]:
        s = job.settings
        train, shape = job.dataset.train, tuple(job.dataset.image_shape)
        pattern = job.rng(7).integers(0, 256, size=shape, dtype=np.uint8)
        pool, poisoned, ref, held = _split_pool(job)
        job.log(f"surrogate pool {len(pool)} images: {len(poisoned)} poisoned -> class {job.target}, "
                f"{len(ref)} reference, {len(held)} other clean; alphas {s['alphas']}")
        test_x, test_y = job.dataset.test.images, job.dataset.test.labels
        victims = test_x[test_y != job.target]
        rows = []
        for a in s["alphas"]:
            atk = cls(shape, job.seed, artifact={"alpha": np.float64(a), "pattern": pattern})
            x = train.images[pool].copy()
            x[poisoned] = atk.apply(x[poisoned])
            y = train.labels[pool].astype(np.int64).copy()
            y[poisoned] = job.target
            res = job.fit(x, y, s["model"], s["epochs"], record=s["record"], training={"augment": s["augment"]})
            rows.append(_measure(res, s, poisoned, ref, held, atk, victims, test_x, test_y, job))
            r = rows[-1]
            job.log(f"alpha {a:g}: ASR {r['asr']:.3f}, clean acc {r['clean_acc']:.3f}, "
                    f"surrogate BaDLoss AUROC {r['knn_auroc']:.3f}, mean loss gap {r['mean_gap']:.4f}")
        i, met = choose(rows, s["criterion"], s["min_asr"])
        if not met:
            job.log(f"no alpha reaches ASR {s['min_asr']:g}; taking alpha {s['alphas'][i]:g}, the highest ASR "
                    f"({rows[i]['asr']:.3f})")
        job.log(f"chosen alpha {s['alphas'][i]:g}")
        return {"alpha": np.float64(s["alphas"][i]), "pattern": pattern, "met_min_asr": np.bool_(met),
                "alphas": np.array(s["alphas"], dtype=np.float64),
                **{k: np.array([r[k] for r in rows], dtype=np.float64) for k in ("asr", "clean_acc", "knn_auroc", "mean_gap")},
                "poison_traj": _stack([r["poison_traj"] for r in rows]),
                "clean_traj": _stack([r["clean_traj"] for r in rows]),
                "surrogate_pool": np.int64(len(pool)), "surrogate_poisoned": np.int64(len(poisoned))}

    def _setup(self) -> None:
        if self.artifact is None:
            self.alpha = self.pattern = None
            return
        a = np.asarray(self._artifact("alpha"))
        if a.shape != () or not (np.isfinite(a) and 0 < a <= 1):
            raise ConfigError(self._key("alpha"), _short(a), "a learned number in (0, 1]")
        p = np.asarray(self._artifact("pattern"))
        if p.shape != self.image_shape or p.dtype != np.uint8:
            raise ConfigError(self._key("pattern"), _short(p), f"a uint8 array of shape {self.image_shape}")
        self.alpha = float(a)
        self.pattern = p.astype(np.float32)

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        if self.pattern is None:
            self._artifact("pattern")
        a = np.float32(min(2 * self.alpha, 1.0) if boost else self.alpha)
        return (1 - a) * x + a * self.pattern


def choose(rows: list[dict], criterion: str, min_asr: float) -> tuple[int, bool]:
    """The index of the most clean-like strength among those reaching `min_asr` (ties: the
    higher ASR, then the weaker strength, i.e. the earlier one), and whether any reached it;
    without any, the highest ASR."""
    ok = [i for i, r in enumerate(rows) if r["asr"] >= min_asr]
    if ok:
        return min(ok, key=lambda i: (rows[i][criterion], -rows[i]["asr"], i)), True
    return max(range(len(rows)), key=lambda i: (rows[i]["asr"], -i)), False


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _split_pool(job: LearnJob) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pool rows of the training set; positions in the pool of the poisoned, reference and other
    clean examples)."""
    s, labels = job.settings, job.dataset.train.labels
    rng = job.rng(11)
    n = len(labels)
    pool = np.sort(rng.choice(n, size=max(1, int(n * s["pool_fraction"])), replace=False))
    ratio = s["poison_ratio"] if s["poison_ratio"] is not None else job.ratio
    if ratio is None:
        raise ConfigError("attacks.adaptive_blend.learn.poison_ratio", None, "a number in (0, 1) (no attack ratio is known)")
    candidates = np.flatnonzero(labels[pool] != job.target)
    k = max(1, int(round(len(pool) * ratio)))
    if k > len(candidates):
        raise ConfigError("attacks.adaptive_blend.learn.poison_ratio", ratio,
                          f"a ratio that poisons at most the {len(candidates)} non-target images of the pool")
    poisoned = np.sort(rng.choice(candidates, size=k, replace=False))
    clean = np.setdiff1d(np.arange(len(pool)), poisoned)
    n_ref = min(int(s["n_reference"]), len(clean) - 1)  # at least one clean example is left to compare with
    if n_ref < 1:
        raise ConfigError("attacks.adaptive_blend.learn.n_reference", s["n_reference"],
                          f"a pool with clean examples to spare (it has {len(clean)})")
    ref = np.sort(rng.choice(clean, size=n_ref, replace=False))
    return pool, poisoned, ref, np.setdiff1d(clean, ref)


def _measure(res, s: dict, poisoned, ref, held, atk: AdaptiveBlend, victims, test_x, test_y, job: LearnJob) -> dict:
    """BaDLoss's view of one surrogate run (kNN AUROC, mean loss gap) and its ASR and accuracy."""
    from sklearn.metrics import roc_auc_score

    from .. import trajectories
    from ..knn import knn_log_distance
    from ..training import predict

    kept = trajectories.accepted_epochs(res.train_loss) if res.losses.shape[0] == len(res.train_loss) else [0]
    t = res.losses[kept].T.astype(np.float32)  # (N, epochs kept)
    if s["log_losses"]:
        t = np.log(np.maximum(t, 1e-6))
    k = min(int(s["k"]), len(ref))
    scores = knn_log_distance(t[np.concatenate([poisoned, held])], t[ref], k)
    auroc = float(roc_auc_score(np.r_[np.ones(len(poisoned)), np.zeros(len(held))], scores)) if len(held) else float("nan")
    clean = np.concatenate([ref, held])
    p_mean, c_mean = t[poisoned].mean(0), t[clean].mean(0)
    asr = float((predict(res.model, atk.apply(victims), job.device) == job.target).mean()) if len(victims) else float("nan")
    acc = float((predict(res.model, test_x, job.device) == test_y).mean()) if len(test_y) else float("nan")
    full_p, full_c = np.full(res.losses.shape[0], np.nan), np.full(res.losses.shape[0], np.nan)
    full_p[kept], full_c[kept] = p_mean, c_mean  # dropped spike epochs stay NaN
    return {"asr": asr, "clean_acc": acc, "knn_auroc": auroc, "mean_gap": float(np.abs(p_mean - c_mean).mean()),
            "poison_traj": full_p, "clean_traj": full_c}


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    return np.stack(rows).astype(np.float64)
