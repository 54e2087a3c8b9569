"""The remedy contract: a registered class per remedy that turns scores into a plan of per-example
weights and trains the final model from it (FinalTraining)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:
    from ..defender import BonaFideSet, DefenderView

REMEDIES: Registry = Registry("remedy", "poisongrid.remedies")


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
    """What a remedy's final training may use: the defender's view of the cell (`view`: images,
    labels as trained on, bona fide flags, the defender model the remedy names, device, seed,
    training settings), the plan's weights and metadata, and where to checkpoint."""

    view: DefenderView
    weights: np.ndarray
    plan_meta: dict
    checkpoint: str | None = None
    fingerprint: str = ""
    phases: list = field(default_factory=list)

    @property
    def images(self):
        return self.view.images

    @property
    def labels(self) -> np.ndarray:
        return self.view.labels

    @property
    def bona_fide(self) -> np.ndarray:
        return self.view.bona_fide

    @property
    def training(self) -> dict:
        return self.view.training

    @property
    def num_classes(self) -> int:
        return self.view.num_classes

    @property
    def seed(self) -> int:
        return self.view.seed

    @property
    def device(self):
        return self.view.device

    @property
    def log(self):
        return self.view.log

    def fit(self, images, labels, phase: str = "train", training: dict | None = None, **kw):
        """One run of the training loop with the dataset's settings (overridden by `training`);
        each phase of a remedy checkpoints on its own."""
        from ..training import fit

        res = fit({**self.training, **(training or {})}, images, labels, self.num_classes, seed=self.seed,
                  device=self.device, checkpoint=f"{self.checkpoint}.{phase}" if self.checkpoint else None,
                  fingerprint=f"{self.fingerprint}:{phase}", log=self.log, **kw)
        self.phases.append((phase, res))
        return res

    def model(self):
        """The defender model this remedy names, in eval mode on the device."""
        return self.view.model()

    def validation(self):
        """The held-out clean validation split: (images, labels), for remedies with `validation`."""
        return self.view.validation()


class Remedy:
    """`params`: name -> default; `needs_detector`: reads a detector's scores; `ground_truth`: a
    reference that reads the manifest's ground truth (never a real defense). `model_param`: the
    parameter naming the defender model the final training reads (None: it reads none).
    `epochs()`: what the final training costs, in epochs of the dataset's training."""

    name: ClassVar[str]
    params: ClassVar[dict] = {}
    needs_detector: ClassVar[bool] = True
    ground_truth: ClassVar[bool] = False
    model_param: ClassVar[str | None] = None
    # Its final training replays the captured training step on a GPU (False: a per-batch objective
    # of its own runs eagerly, and its time estimate uses the dataset's eager rate).
    graphed: ClassVar[bool] = True

    @classmethod
    def epochs(cls, d: dict, data: dict) -> float:
        """The final training's GPU work in epochs of the dataset's training (`data`: num_classes,
        n_train, n_clean, epochs); by default one full training."""
        return float(data["epochs"])

    @classmethod
    def budget_note(cls, d: dict) -> str | None:
        """Where a defense entry's settings fall short of the reference's procedure, in words (the
        tables mark it); None where they do not."""
        return None

    @classmethod
    def uses_validation(cls, d: dict) -> bool:
        """Whether a defense entry's final training reads the held-out validation split of the test
        set (FinalTraining.validation()); the grid's evaluation then scores the rest of the test set."""
        return False

    @classmethod
    def reads_model(cls, d: dict) -> str | None:
        """The defender model a defense entry's final training reads."""
        return d.get(cls.model_param, cls.params.get(cls.model_param)) if cls.model_param else None

    def __init__(self, **params):
        self.p = {**self.params, **params}

    @classmethod
    def check(cls, d: dict, key: str, cfg: dict, bona: BonaFideSet) -> dict:
        """Check a defense entry's remedy parameters; return them with defaults filled in. `cfg` is
        the grid's config (its detectors and defender models), `bona` the bona fide set the
        defense reads."""
        allowed = set(cls.params) | {"remedy", "arch"} | ({"detector"} if cls.needs_detector else set())
        for k in d:
            if k not in allowed:
                raise ConfigError(f"{key}.{k}", d[k], f"one of {sorted(allowed - {'remedy'})} for remedy '{cls.name}'")
        if cls.needs_detector:
            dets = sorted(cfg["detectors"])
            if d.get("detector") not in cfg["detectors"]:
                raise ConfigError(f"{key}.detector", d.get("detector"), f"one of the configured detectors {dets}")
        model = cls.reads_model(d)
        if cls.model_param and "arch" in d:
            # Its final model starts from (or is shaped by) that defender model: its architecture is that model's.
            raise ConfigError(f"{key}.arch", d["arch"], f"nothing for remedy '{cls.name}': set the architecture as "
                              f"defender_models.{model}.model")
        if cls.model_param and model not in cfg["defender_models"]:
            raise ConfigError(f"{key}.{cls.model_param}", model, f"one of the defender models {sorted(cfg['defender_models'])}")
        return {**cls.params, **{k: v for k, v in d.items() if k in cls.params}}

    @classmethod
    def of(cls, d: dict) -> "Remedy":
        """The remedy a defense entry (or a plan stage's spec) configures: its own parameters only."""
        return cls(**{k: v for k, v in d.items() if k in cls.params})

    def weights(self, scores: np.ndarray, manifest, score_meta: dict) -> np.ndarray:
        """One weight per manifest row. `manifest`: an Arrow table from the plan stage, or a pandas
        DataFrame: read it with `len(manifest)` and `io.to_numpy(manifest[column])`."""
        raise NotImplementedError

    def plan_meta(self) -> dict:
        """What the final training must know besides the weights."""
        return {}

    def weight_range(self) -> tuple[float, float]:
        """The smallest and largest weight this remedy's plans can hold (a plan outside it was
        not made by this remedy with these parameters and is refused)."""
        return 0.0, 1.0

    def train(self, job: FinalTraining):
        """The final model: by default trained from scratch on the weighted loss, weight-0
        examples left out. Returns the training loop's result (its model is the final model)."""
        keep = job.weights != 0
        return job.fit(job.images.subset(keep), job.labels[keep], weights=job.weights[keep],
                       ascent_clamp=job.plan_meta.get("ascent_clamp"))
