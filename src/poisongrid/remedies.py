"""Remedies: what a defense does with the scores. Each returns the mask of removed examples."""
from __future__ import annotations

import numpy as np

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


@REMEDIES.register("none")
def _none(scores, bona_fide, spec) -> np.ndarray:
    return np.zeros(len(bona_fide), dtype=bool)


@REMEDIES.register("remove")
def _remove(scores, bona_fide, spec) -> np.ndarray:
    return select_removed(scores, bona_fide, spec["r_reject"])
