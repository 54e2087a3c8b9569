"""FTrojan frequency-domain trigger (Wang et al. 2021), as configured in BaDLoss."""
from __future__ import annotations

import functools

import numpy as np

from ..errors import ConfigError
from .base import ATTACKS, Attack

# RGB -> YCrCb, ITU-R BT.601 full range, the coefficients OpenCV uses (offset 128 on Cr, Cb).
_Y = np.array([0.299, 0.587, 0.114])
RGB2YCRCB = np.stack([_Y, 0.713 * (np.array([1.0, 0, 0]) - _Y), 0.564 * (np.array([0, 0, 1.0]) - _Y)])
YCRCB2RGB = np.linalg.inv(RGB2YCRCB)  # exact inverse, so an empty trigger is the identity
YCRCB_OFFSET = np.array([0.0, 128.0, 128.0])


@ATTACKS.register("frequency")
class Frequency(Attack):
    """FTrojan: RGB -> YCrCb, orthonormal 2-D DCT of every `block` x `block` tile, add `magnitude`
    at each of `positions` (within the tile) in Cr and Cb, inverse DCT, back to RGB, clip, round.
    Reference (BaDLoss): magnitude 30 (90 on Imagenette/ImageNet), block 32, positions (15,15) and
    (31,31); boost (ASR) doubles the magnitude. Images are RGB, values in [0, 255].

    Implementation: every step is linear, so the trigger is one fixed additive RGB pattern,
    computed once (a Y-free chroma pattern mapped back through the inverse colour matrix). It is
    the same as running the steps on each image in float.

    Deviations from the reference code, on purpose:
    - no uint8 quantisation of YCrCb and no truncation after the inverse DCT: the reference's
      round trip changes ~45% of values by up to 4/255 even at magnitude 0; here magnitude 0 is
      the identity and the result is rounded;
    - values are clipped to [0, 255]; the reference casts to uint8 unclipped, so saturated
      pixels wrap around (e.g. 256 -> 0) on 224-px images and boosted triggers;
    - with H or W not a multiple of `block`, only the full tiles get the trigger and the
      remainder at the bottom/right is left unchanged (as the reference's tile loop does);
    - `block` defaults to 32, or to min(H, W) on images smaller than 32 px; positions default
      to (block//2 - 1, block//2 - 1) and (block - 1, block - 1), i.e. (15,15), (31,31) at 32.
    """

    name = "frequency"
    boostable = True
    defaults = {"magnitude": 30.0, "block": None, "positions": None}

    def _setup(self) -> None:
        c, h, w = self.image_shape
        if c != 3:
            raise ConfigError(self._key("image_shape"), self.image_shape, "3 (RGB) channels")
        self._number("magnitude", 0.0, lo_open=False)  # 0 allowed: a no-op, useful as a check
        if self.params["block"] is None:
            self.params["block"] = min(32, h, w)
        b = self._int("block", 1, min(h, w))
        pos = self.params["positions"]
        if pos is None:
            pos = [[b // 2 - 1, b // 2 - 1], [b - 1, b - 1]] if b > 1 else [[0, 0]]
        try:
            pos = [(int(r), int(q)) for r, q in pos]
            ok = len(pos) > 0 and all(0 <= r < b and 0 <= q < b for r, q in pos)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(self._key("positions"), self.params["positions"],
                              f"a non-empty list of [row, col] pairs within the {b}x{b} block")
        self.params["positions"] = [list(p) for p in pos]

    @functools.cached_property
    def delta(self) -> np.ndarray:
        """The additive RGB trigger (float32 C x H x W). Made on first use, so a config check that
        builds the attack to validate its parameters never imports scipy."""
        from scipy.fft import idctn

        _, h, w = self.image_shape
        b = int(self.params["block"])
        coef = np.zeros((b, b))
        for r, q in self.params["positions"]:
            coef[r, q] += float(self.params["magnitude"])
        tile = idctn(coef, norm="ortho")  # the chroma change of one tile
        chroma = np.zeros((h, w))
        nh, nw = h // b, w // b
        chroma[:nh * b, :nw * b] = np.tile(tile, (nh, nw))
        ycrcb = np.stack([np.zeros((h, w)), chroma, chroma])  # Y untouched, Cr and Cb both
        return np.einsum("ij,jhw->ihw", YCRCB2RGB, ycrcb).astype(np.float32)

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        return x + (2 * self.delta if boost else self.delta)
