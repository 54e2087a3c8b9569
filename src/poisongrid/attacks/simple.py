"""Pixel-patch attacks (Gu et al. 2017) and blending attacks (Chen et al. 2017, Liao et al. 2018,
Barni et al. 2019), as configured in BaDLoss (Alex et al., ICLR 2025, Appendix I.1)."""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..errors import ConfigError
from .base import ATTACKS, Attack

_CORNERS = ("bottom_right", "top_left")


class _Corner(Attack):
    """White pixels near a corner. Each pixel is a `scale` x `scale` block (default 1 up to 64 px,
    else H // 28, i.e. 8 at 224 px). `corner='bottom_right'` (default) puts the pixel d from the
    bottom/right edge at rows [H - d*s, H - (d-1)*s); `top_left` mirrors it to rows [(d-1)*s, d*s)."""

    offsets: ClassVar[tuple[tuple[int, int], ...]]  # (rows, cols) from the bottom/right edge, in blocks
    defaults = {"scale": None, "corner": "bottom_right"}

    def _setup(self) -> None:
        _, h, w = self.image_shape
        if self.params["scale"] is None:
            self.params["scale"] = 1 if h <= 64 else h // 28
        reach = max(max(o) for o in self.offsets)
        if min(h, w) < reach:
            raise ConfigError(self._key("scale"), self.params["scale"], f"an image of at least {reach} px")
        s = self._int("scale", 1, min(h, w) // reach)
        corner = self.params["corner"]
        if corner not in _CORNERS:
            raise ConfigError(self._key("corner"), corner, f"one of {list(_CORNERS)}")
        self.mask = np.zeros((h, w), dtype=bool)
        for dr, dc in self.offsets:
            r, c = ((h - dr * s, w - dc * s) if corner == "bottom_right" else ((dr - 1) * s, (dc - 1) * s))
            self.mask[r:r + s, c:c + s] = True

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        x[:, :, self.mask] = 255.0  # x is already a private float copy
        return x


@ATTACKS.register("patch")
class Patch(_Corner):
    """4-pixel checkerboard: white at (H-2,W-2), (H-4,W-2), (H-2,W-4), (H-3,W-3), all channels.
    Reference: BaDLoss CIFAR-10/GTSRB at 32 px (scale 1). At 224 px the reference draws 8x8 blocks
    at rows/cols [8:16,8:16], [24:32,8:16], [8:16,24:32], [16:24,16:24], i.e. the same pattern in
    the top-left corner: reproduce that with `corner='top_left'`. Our default keeps the bottom-right
    corner at every size (deviation at 224 px, position only). No boost."""

    name = "patch"
    offsets = ((2, 2), (4, 2), (2, 4), (3, 3))


@ATTACKS.register("single_pixel")
class SinglePixel(_Corner):
    """One white pixel at (H-2, W-2), all channels, as a `scale` x `scale` block on large images.
    Reference: BaDLoss CIFAR-10/GTSRB (the paper does not run it on Imagenette). No boost."""

    name = "single_pixel"
    offsets = ((2, 2),)


class _Blend(Attack):
    """x' = (1 - a) x + a p, with p in [0, 255] units. Boost (ASR): a -> min(2a, 1); the cap keeps
    the boosted trigger a blend (only reachable with a > 0.5, far above any reference value)."""

    boostable = True

    def _setup(self) -> None:
        self.alpha = self._number("alpha", 0.0, 1.0)
        self.pattern = self._pattern().astype(np.float32)

    def _pattern(self) -> np.ndarray:
        raise NotImplementedError

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        a = np.float32(min(2 * self.alpha, 1.0) if boost else self.alpha)
        return (1 - a) * x + a * self.pattern


@ATTACKS.register("blend_random")
class BlendRandom(_Blend):
    """Blend-R (Chen et al. 2017): uniform noise, each value k/255 with k in 0..255 per pixel and
    channel, drawn once from `seed` and reused at test time. Reference: alpha 0.075 (0.15 on
    Imagenette/ImageNet)."""

    name = "blend_random"
    defaults = {"alpha": 0.075}

    def _pattern(self) -> np.ndarray:
        return np.random.default_rng(self.seed).integers(0, 256, size=self.image_shape)


@ATTACKS.register("blend_pattern")
class BlendPattern(_Blend):
    """Blend-P (Liao et al. 2018): a lattice of dots, white on every pixel whose row and column
    are both even, black elsewhere. Reference: alpha 0.025 (0.15 on Imagenette/ImageNet, where the
    authors' code blends all three attacks at one alpha)."""

    name = "blend_pattern"
    defaults = {"alpha": 0.025}

    def _pattern(self) -> np.ndarray:
        p = np.zeros(self.image_shape)
        p[:, ::2, ::2] = 255.0
        return p


@ATTACKS.register("sinusoid")
class Sinusoid(_Blend):
    """Sinusoid (Barni et al. 2019), clean-label: vertical stripes p[:, :, col] =
    1 - cos(2 pi col cycles / W) in [0, 2] ([0,1] units, so up to 510 here), blended and clipped.
    Reference: alpha 0.075 (0.15 on Imagenette/ImageNet), 6 cycles."""

    name = "sinusoid"
    clean_label = True
    defaults = {"alpha": 0.075, "cycles": 6}

    def _pattern(self) -> np.ndarray:
        c, h, w = self.image_shape
        cycles = self._number("cycles", 0.0)
        col = 255.0 * (1 - np.cos(2 * np.pi * np.arange(w) * cycles / w))
        return np.broadcast_to(col, (c, h, w))
