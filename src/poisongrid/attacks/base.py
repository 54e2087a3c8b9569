"""The Attack interface: a seeded, parameterised per-image transformation (the trigger)."""
from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError
from ..registry import Registry

ATTACKS: Registry[type["Attack"]] = Registry("attack")

_CHUNK = 256  # images converted to float at once: bounds memory on 224-px test sets


class Attack:
    """Base class. Subclasses set `defaults` (param -> default), validate in `_setup` and
    return float images in [0, 255] units from `_apply`; `apply` rounds and clips to uint8."""

    name: ClassVar[str]
    clean_label: ClassVar[bool] = False  # poisons only target-class images, labels kept
    boostable: ClassVar[bool] = False  # ASR is also reported with a 2x boosted trigger
    needs_trigger_file: ClassVar[bool] = False  # trigger made by a separate (optimisation) stage
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, image_shape: tuple[int, int, int], seed: int, **params):
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
        self.image_shape: tuple[int, int, int] = shape
        self.seed = int(seed)
        for p in params:
            if p not in self.defaults:
                raise ConfigError(self._key(p), _short(params[p]), f"one of {sorted(self.defaults)}")
        self.params = {**self.defaults, **params}
        self._setup()

    def _key(self, param: str) -> str:
        return f"attacks.{self.name}.{param}"

    def _setup(self) -> None:  # validate params, precompute the trigger
        pass

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        raise NotImplementedError

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


def build_attack(name: str, image_shape, seed: int, params: dict | None = None) -> Attack:
    return ATTACKS.get(name, "attacks")(image_shape, seed, **(params or {}))
