"""The Attack interface: a seeded, parameterised per-image transformation (the trigger)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from ..errors import ConfigError
from ..registry import Registry

ATTACKS: Registry[type["Attack"]] = Registry("attack", "poisongrid.attacks")

_CHUNK = 256  # images converted to float at once: bounds memory on 224-px test sets


@dataclass
class LearnJob:
    """What an attack's learning step (the `trigger` stage) may use: the clean dataset, the
    attack's target class, the cell's seed, the attack's own parameters and `learn` settings, the
    dataset's training settings (a surrogate's optimiser, batch size, augmentation), the device,
    and the attack's poisoning `ratio` (None where unknown)."""

    dataset: Any
    target: int
    seed: int
    params: dict
    settings: dict
    training: dict
    device: Any
    log: Callable[[str], None] = field(default=lambda msg: None)
    ratio: float | None = None

    def fit(self, images, labels, model: str, epochs: int, **kw):
        """Train an attacker's model with the training loop (the dataset's settings, this model
        and epochs); `num_classes` (default: the dataset's) sizes its head, `training` overrides
        training settings."""
        from ..training import fit

        training = {**self.training, "model": model, "epochs": int(epochs), **kw.pop("training", {})}
        num_classes = int(kw.pop("num_classes", self.dataset.num_classes))
        return fit(training, images, labels, num_classes, seed=self.seed, device=self.device, log=self.log, **kw)

    def rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *stream])


class Attack:
    """Base class. Subclasses set `defaults` (param -> default), validate in `_setup` and
    return float images in [0, 255] units from `_apply`; `apply` rounds and clips to uint8.

    An attack that needs something trained before poisoning (an optimised trigger, a generator,
    an adversarial model's perturbations) sets `learn_defaults` (its `learn:` settings) and
    implements `learn(job) -> arrays`; the `trigger` stage runs it once per (dataset, attack,
    seed) and the attack is then built with `artifact=` those arrays. Built without its artifact
    (config checks) it validates its parameters but cannot be applied. `poison()` is the training-
    time transformation, `apply()` the test-time trigger; they differ where an attack's training
    images carry more than its trigger (label-consistent's adversarial perturbation)."""

    name: ClassVar[str]
    clean_label: ClassVar[bool] = False  # poisons only target-class images, labels kept
    boostable: ClassVar[bool] = False  # ASR is also reported with a 2x boosted trigger
    defaults: ClassVar[dict[str, Any]] = {}
    learn_defaults: ClassVar[dict[str, Any] | None] = None
    # The learning step's budget in the attack's reference code (the `learn:` keys that set it);
    # a smaller setting is recorded with the poisoned set and marked in the tables.
    reference_learn: ClassVar[dict[str, Any]] = {}
    reference_source: ClassVar[str] = ""

    def __init__(self, image_shape: tuple[int, int, int], seed: int, artifact: dict | None = None, **params):
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
        self.image_shape: tuple[int, int, int] = shape
        self.seed = int(seed)
        for p in params:
            if p not in self.defaults:
                raise ConfigError(self._key(p), _short(params[p]), f"one of {sorted(self.defaults)}")
        self.params = {**self.defaults, **params}
        self.artifact = artifact
        self._setup()

    @classmethod
    def learns(cls) -> bool:
        return cls.learn_defaults is not None

    @classmethod
    def check_learn(cls, settings: dict, key: str, deep: bool = True) -> dict:
        """The `learn:` settings with defaults filled in; unknown keys and wrong types are errors
        (`deep`: also checks that import torch, e.g. model names)."""
        if not cls.learns():
            if settings:
                raise ConfigError(key, settings, f"nothing: attack '{cls.name}' learns nothing before poisoning")
            return {}
        if not isinstance(settings, dict):
            raise ConfigError(key, settings, f"a mapping with keys among {sorted(cls.learn_defaults)}")
        for k, v in settings.items():
            if k not in cls.learn_defaults:
                raise ConfigError(f"{key}.{k}", v, f"one of {sorted(cls.learn_defaults)}")
            d = cls.learn_defaults[k]
            if isinstance(d, bool) and not isinstance(v, bool):
                raise ConfigError(f"{key}.{k}", v, "true or false")
            if isinstance(d, (int, float)) and not isinstance(d, bool):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (isinstance(d, int) and not isinstance(v, int)):
                    raise ConfigError(f"{key}.{k}", v, "a positive integer" if isinstance(d, int) else "a positive number")
            if isinstance(d, str) and not isinstance(v, str):
                raise ConfigError(f"{key}.{k}", v, "a string")
        s = {**cls.learn_defaults, **settings}
        # What every attacker's surrogate shares: a fraction of the training set it holds, a model.
        if "pool_fraction" in s and s["pool_fraction"] > 1:
            raise ConfigError(f"{key}.pool_fraction", s["pool_fraction"], "a number in (0, 1]")
        if deep and isinstance(s.get("model"), str):
            from ..zoo import MODELS

            MODELS.check(s["model"], f"{key}.model")
        return s

    @classmethod
    def learn_epochs(cls, settings: dict) -> float:
        """The learning step's GPU work in epochs of the dataset's training (cost estimates)."""
        return float(settings.get("epochs", 0))

    @classmethod
    def learn_graphed_epochs(cls, settings: dict) -> float:
        """The part of learn_epochs that is a plain training run (the graph-replayed step on a GPU,
        at the dataset's faster rate); the rest runs eagerly."""
        return 0.0

    @classmethod
    def budget_note(cls, settings: dict) -> str | None:
        """Where `learn:` settings fall short of the reference's budget, in words (None: nowhere)."""
        short = []
        for k, ref in cls.reference_learn.items():
            v = settings.get(k)
            if isinstance(ref, bool):
                if ref and v is False:
                    short.append(f"{k} off")
            elif isinstance(v, (int, float)) and v < ref:
                short.append(f"{k} {v:g} (reference {ref:g})")
        if not short:
            return None
        return "learned with " + ", ".join(short) + (f"; {cls.reference_source}" if cls.reference_source else "")

    @classmethod
    def learn(cls, job: LearnJob) -> dict[str, np.ndarray]:
        raise NotImplementedError(f"attack '{cls.name}' learns nothing")

    def _artifact(self, key: str) -> np.ndarray:
        if self.artifact is None or key not in self.artifact:
            raise ConfigError(f"attacks.{self.name}", "no learned artifact", "the file the trigger stage makes (--trigger)")
        return self.artifact[key]

    def _key(self, param: str) -> str:
        return f"attacks.{self.name}.{param}"

    def _setup(self) -> None:  # validate params, precompute the trigger
        pass

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        raise NotImplementedError

    def poison(self, images: np.ndarray, index: np.ndarray) -> np.ndarray:
        """The poisoned training images (uint8) of dataset rows `index`; by default the trigger."""
        return self.apply(images)

    def apply(self, images: np.ndarray, boost: bool = False) -> np.ndarray:
        """A new uint8 array of the same shape holding the triggered images; the input is not
        changed. `boost=True` gives the 2x test-time trigger; it is ignored when not boostable."""
        x = np.asarray(images)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != self.image_shape:
            raise ValueError(f"{self.name}: expected uint8 images of shape (N, {', '.join(map(str, self.image_shape))}), "
                             f"got {x.dtype} {x.shape}")
        out = np.empty_like(x)
        for i in range(0, len(x), _CHUNK):
            y = self._apply(x[i:i + _CHUNK].astype(np.float32), bool(boost) and self.boostable)
            out[i:i + _CHUNK] = np.clip(np.rint(y), 0, 255)  # round, never truncate
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.image_shape}, seed={self.seed}, {self.params})"

    # ---- parameter checks: every failure names the key, the value and what is allowed ----

    def _number(self, p: str, lo: float, hi: float = math.inf, *, lo_open: bool = True, hi_open: bool = False) -> float:
        v = self.params[p]
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
            raise ConfigError(self._key(p), _short(v), f"a number in {rng}")
        return float(v)

    def _int(self, p: str, lo: int, hi: int) -> int:
        v = self.params[p]
        if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and lo <= v <= hi):
            raise ConfigError(self._key(p), _short(v), f"an integer in [{lo}, {hi}]")
        return int(v)


def _short(v: Any) -> Any:
    """Arrays would flood an error message: describe them instead."""
    if isinstance(v, np.ndarray):
        return f"array{v.shape} {v.dtype}"
    return v


# Keys of an attack entry that place it in a scenario rather than parameterise its trigger.
SCENARIO_KEYS = ("ratio", "min_count", "min_target_count", "target", "learn")


def attack_params(a: dict) -> dict:
    """An attack entry minus the scenario-level keys: what the Attack class itself takes."""
    return {k: v for k, v in a.items() if k not in SCENARIO_KEYS}


def build_attack(name: str, image_shape, seed: int, params: dict | None = None, artifact: dict | None = None) -> Attack:
    return ATTACKS.get(name, "attacks")(image_shape, seed, artifact=artifact, **(params or {}))
