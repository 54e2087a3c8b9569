"""ABL's unlearning (Li et al. 2021): isolate the few examples an isolation model fits fastest,
fine-tune that model on the rest, then unlearn the isolated ones by gradient ascent."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..io import to_numpy
from .base import REMEDIES, FinalTraining, Remedy, _number, select_removed


def _positive(key: str, v, integer: bool) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (not integer or isinstance(v, int))
    if not ok:
        raise ConfigError(key, v, "a positive integer" if integer else "a positive number")


@REMEDIES.register("unlearn")
class Unlearn(Remedy):
    """ABL's second stage. The r_isolate fraction with the highest scores (from the `abl`
    detector: the lowest losses under the isolation model; never a bona fide example) is isolated
    (weight -1), the rest kept (weight 1). Starting from the isolation defender model `model`:
    phase `finetune` trains on the kept examples for finetune_epochs at finetune_lr (default: the
    dataset's lr) with the dataset's optimiser and augmentation; phase `unlearn` then minimises
    -CE on the isolated examples (gradient ascent, each loss clamped at ascent_clamp) for
    unlearn_epochs at unlearn_lr with unlearn_optimizer (null: the dataset's), without
    augmentation. Defaults follow ABL's code: 1%, 60 fine-tuning epochs, 5 unlearning epochs
    with SGD (momentum 0.9) at 5e-4 (LfD's runs: 20 epochs at 1e-4).

    Deviations from ABL's code: fine-tuning uses the dataset's optimiser and weight decay (ABL:
    SGD, nesterov, momentum 0.9, wd 1e-4; the unlearning SGD here: plain momentum, the dataset's
    wd) and each phase follows the training loop's cosine schedule (ABL: 0.1, then 0.01 from
    epoch 40 for fine-tuning, a constant 5e-4 for unlearning; a cosine over 5 epochs averages
    about 0.6 of unlearn_lr); ABL's first unlearning epoch only evaluates, here every epoch
    steps; the ascent loss is clamped (ABL's is not) so it cannot inflate the logits without
    bound. Fine-tuning is on the non-isolated examples, as ABL's code (LfD describes it on the
    entire training set). BatchNorm stays in training mode during unlearning, as in ABL; with
    few isolated examples (one batch) its statistics come from that batch alone. The isolation
    model must have the dataset's architecture: the final model continues from it."""

    name = "unlearn"
    params = {"r_isolate": 0.01, "finetune_epochs": 60, "finetune_lr": None, "unlearn_epochs": 5,
              "unlearn_lr": 5e-4, "unlearn_optimizer": "sgd", "ascent_clamp": 10.0, "model": "isolation"}
    model_param = "model"

    @classmethod
    def epochs(cls, d: dict, data: dict) -> float:
        p = {**cls.params, **d}
        return (1 - p["r_isolate"]) * p["finetune_epochs"] + p["r_isolate"] * p["unlearn_epochs"]

    @classmethod
    def check(cls, d, key, cfg, bona) -> dict:
        p = super().check(d, key, cfg, bona)
        _number(f"{key}.r_isolate", p["r_isolate"], 0, 1, True, True)
        for k in ("finetune_epochs", "unlearn_epochs"):
            _positive(f"{key}.{k}", p[k], integer=True)
        for k in ("unlearn_lr", "ascent_clamp") + (("finetune_lr",) if p["finetune_lr"] is not None else ()):
            _positive(f"{key}.{k}", p[k], integer=False)
        from ..zoo import OPTIMIZERS

        if p["unlearn_optimizer"] is not None:
            if not isinstance(p["unlearn_optimizer"], str):
                raise ConfigError(f"{key}.unlearn_optimizer", p["unlearn_optimizer"], f"one of {OPTIMIZERS.names()} or null")
            OPTIMIZERS.check(p["unlearn_optimizer"], f"{key}.unlearn_optimizer")
        arch = cfg["defender_models"][p["model"]].get("model")
        for dsname, ds in cfg.get("datasets", {}).items():
            if arch is not None and dsname in d.get("datasets", [dsname]) and arch != ds["model"]:
                raise ConfigError(f"defender_models.{p['model']}.model", arch,
                                  f"the model of dataset '{dsname}' ('{ds['model']}'): defense '{key.split('.')[-1]}' "
                                  "fine-tunes the isolation model into the final one")
        return p

    def weights(self, scores, manifest, score_meta) -> np.ndarray:
        isolated = select_removed(scores, to_numpy(manifest["bona_fide"]), self.p["r_isolate"])
        return np.where(isolated, -1.0, 1.0).astype(np.float32)

    def plan_meta(self) -> dict:
        return {"ascent_clamp": float(self.p["ascent_clamp"])}

    def weight_range(self) -> tuple[float, float]:
        return -1.0, 1.0

    def train(self, job: FinalTraining):
        iso = job.weights < 0
        rest = ~iso
        tune = {"epochs": int(self.p["finetune_epochs"])}
        if self.p["finetune_lr"] is not None:
            tune["lr"] = float(self.p["finetune_lr"])
        res = job.fit(job.images.subset(rest), job.labels[rest], phase="finetune", training=tune, init_model=job.model())
        if not iso.any():
            if job.log:
                job.log("unlearn: no isolated examples, the fine-tuned model is final")
            return res
        return job.fit(job.images.subset(iso), job.labels[iso], phase="unlearn", init_model=res.model,
                       weights=np.full(int(iso.sum()), -1.0, dtype=np.float32), ascent_clamp=float(self.p["ascent_clamp"]),
                       training={"epochs": int(self.p["unlearn_epochs"]), "lr": float(self.p["unlearn_lr"]), "augment": "none",
                                 **({"optimizer": self.p["unlearn_optimizer"]} if self.p["unlearn_optimizer"] else {})})
