"""Fixed-trigger attacks of the LfD evaluation (Chen et al., LfD, section 5): BadNets with a white
square (BN-W) or a black/white grid (BN-G) (Gu et al. 2017), and SIG, the clean-label additive
sinusoidal signal (Barni et al. 2019)."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .base import ATTACKS, Attack

CORNERS = ("bottom_right", "top_left")


def default_scale(h: int) -> int:
    """Pixels per trigger cell: 1 up to 64 px, else H // 28 (8 at 224 px), as attacks.simple does."""
    return 1 if h <= 64 else h // 28


def corner_box(shape: tuple[int, int, int], size: int, margin: int, corner: str) -> tuple[slice, slice]:
    """Rows and columns of a `size` x `size` square `margin` px from the chosen corner."""
    _, h, w = shape
    if corner == "bottom_right":
        return slice(h - margin - size, h - margin), slice(w - margin - size, w - margin)
    return slice(margin, margin + size), slice(margin, margin + size)


class _Square(Attack):
    """A 3x3-cell pattern stamped (alpha 1) into a corner, the label flipped to the target.
    `size`: the square's side in px (default 3 cells of default_scale px: 3 at 32 px, 24 at 224 px);
    `margin`: px between the square and the image edges (0: touching them, as BackdoorBench's
    trigger images; ABL's white square sits 1 px in); `corner`: 'bottom_right' or 'top_left'."""

    defaults = {"size": None, "margin": 0, "corner": "bottom_right"}

    def _setup(self) -> None:
        _, h, w = self.image_shape
        if self.params["size"] is None:
            self.params["size"] = 3 * default_scale(h)
        size = self._int("size", self._min_size, min(h, w))
        margin = self._int("margin", 0, min(h, w) - size)
        corner = self.params["corner"]
        if corner not in CORNERS:
            raise ConfigError(self._key("corner"), corner, f"one of {list(CORNERS)}")
        self.box = corner_box(self.image_shape, size, margin, corner)
        self.patch = self._patch(size).astype(np.float32)  # (size, size) in [0, 255]

    _min_size = 1

    def _patch(self, size: int) -> np.ndarray:
        raise NotImplementedError

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        rows, cols = self.box
        x[:, :, rows, cols] = self.patch  # broadcast over images and channels
        return x


@ATTACKS.register("badnets_white")
class BadNetsWhite(_Square):
    """BN-W: a white `size` x `size` square (every channel 255) in the bottom-right corner.
    Reference: BackdoorBench resource/badnet (3x3 at the edge of a 32-px image). No boost."""

    name = "badnets_white"

    def _patch(self, size: int) -> np.ndarray:
        return np.full((size, size), 255.0)


@ATTACKS.register("badnets_grid")
class BadNetsGrid(_Square):
    """BN-G: a 3x3 checkerboard of `size // 3`-px cells (size a multiple of 3). With
    `pattern='checkerboard'` (default, BackdoorBench's generate_grid.py) cell (i, j), counted from
    the square's top-left, is white (255) when i + j is even: the four corner cells and the centre,
    the other four black (0; BackdoorBench writes 1 there only because 0 marks transparent pixels
    in its stamping). `pattern='abl'` is the ABL/NAD code's grid (LfD compares against ABL): the
    same but its top-left cell black, i.e. 4 white cells. No boost."""

    name = "badnets_grid"
    defaults = {**_Square.defaults, "pattern": "checkerboard"}
    _min_size = 3
    PATTERNS = ("checkerboard", "abl")

    def _patch(self, size: int) -> np.ndarray:
        if size % 3:
            raise ConfigError(self._key("size"), size, "a multiple of 3 (3x3 cells)")
        kind = self.params["pattern"]
        if kind not in self.PATTERNS:
            raise ConfigError(self._key("pattern"), kind, f"one of {list(self.PATTERNS)}")
        i, j = np.indices((3, 3))
        cells = ((i + j) % 2 == 0).astype(np.float64) * 255.0
        if kind == "abl":
            cells[0, 0] = 0.0
        return np.kron(cells, np.ones((size // 3, size // 3)))


@ATTACKS.register("sig")
class Sig(Attack):
    """SIG (Barni et al. 2019), clean-label: x' = clip(x + v), v(i, j) = delta sin(2 pi j f / m) for
    column j = 0..m-1 (m the image width), the same on every row and channel, in [0, 255] units.
    Training images (poison) use `delta_train`, the test trigger (apply) `delta_test`; f =
    `frequency`. The paper's sinusoid is trained at delta 20, f 6 (its test-time amplitude could
    not be checked here: the default keeps 20; BackdoorBench uses 40 for both). Results are
    rounded, where BackdoorBench truncates. No boost: a larger test signal is `delta_test`."""

    name = "sig"
    clean_label = True
    defaults = {"delta_train": 20, "delta_test": 20, "frequency": 6}

    def _setup(self) -> None:
        self.delta_train = self._number("delta_train", 0.0, 255.0)
        self.delta_test = self._number("delta_test", 0.0, 255.0)
        self.frequency = self._number("frequency", 0.0)
        self.v_test = self.signal(self.delta_test)

    def signal(self, delta: float) -> np.ndarray:
        c, h, w = self.image_shape
        row = delta * np.sin(2 * np.pi * np.arange(w) * self.frequency / w)
        return np.broadcast_to(row, (c, h, w)).astype(np.float32)

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        return x + self.v_test

    def poison(self, images: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Training images carry the training amplitude."""
        train = type(self)(self.image_shape, self.seed, **{**self.params, "delta_test": self.params["delta_train"]})
        return train.apply(images)
