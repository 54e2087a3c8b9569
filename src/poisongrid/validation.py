"""The held-out validation split: a seeded part of the clean test set that a defense may use as
clean data the attacked model never saw (fine-pruning prunes against it and fine-tunes on it, as
the original and BackdoorBench do with clean held-out data), and that evaluation then never
scores. It exists only in grids with a defense that reads it; there every defense of the dataset
is evaluated on the rest of the test set, so their numbers stay comparable."""
from __future__ import annotations

import numpy as np

STREAM = 0x76616C  # the split's own random stream, apart from every other draw of the seed


def split(labels: np.ndarray, fraction: float, seed: int, stratified: bool = True) -> np.ndarray:
    """Sorted test-set rows held out for validation: round(fraction x n) drawn uniformly, or
    round(fraction x n_c) of each class c (stratified)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([int(seed), STREAM])
    if not stratified:
        k = int(round(fraction * len(labels)))
        return np.sort(rng.permutation(len(labels))[:k])
    picked = [rng.permutation(np.flatnonzero(labels == c))[:int(round(fraction * (labels == c).sum()))]
              for c in np.unique(labels)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def evaluated(n_test: int, held_out: np.ndarray) -> np.ndarray:
    """The test rows evaluation scores: all but the held-out ones."""
    keep = np.ones(n_test, dtype=bool)
    keep[held_out] = False
    return keep
