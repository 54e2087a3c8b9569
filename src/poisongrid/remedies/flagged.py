"""Remove exactly the examples a detector flagged, however many that is."""
from __future__ import annotations

import numpy as np

from ..io import to_numpy
from .base import REMEDIES, Remedy, _number


@REMEDIES.register("remove_flagged")
class RemoveFlagged(Remedy):
    """Drop every example whose score is > `threshold` (never a bona fide one); retrain.

    Contract for detectors with a yes/no decision of their own (Activation Clustering, Neural
    Cleanse, frequency analysis): their scores put that decision at 0, score > 0 meaning flagged,
    so the default threshold 0 reproduces the method's own removal rather than a fixed fraction.
    Another threshold moves the cut along the same scores."""

    name = "remove_flagged"
    params = {"threshold": 0.0}

    @classmethod
    def check(cls, d, key, cfg, bona) -> dict:
        p = super().check(d, key, cfg, bona)
        _number(f"{key}.threshold", p["threshold"], -float("inf"), float("inf"), True, True)
        return p

    def weights(self, scores, manifest, score_meta) -> np.ndarray:
        drop = (np.asarray(scores) > self.p["threshold"]) & ~to_numpy(manifest["bona_fide"])
        return (~drop).astype(np.float32)
