"""Remedies: what a defense does with the scores. Each returns the mask of removed examples.

A remedy sees the defender's view of the manifest (`index`, `label`, `bona_fide`), except the
`oracle` reference, which is marked `ground_truth` and removes exactly the poisoned examples: it
is no defense but the floor any filtering defense could reach (it shows, e.g., how much of a
boosted trigger's ASR is natural transfer rather than a learned backdoor)."""
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
def _none(scores, manifest, spec) -> np.ndarray:
    return np.zeros(len(manifest), dtype=bool)


@REMEDIES.register("remove")
def _remove(scores, manifest, spec) -> np.ndarray:
    return select_removed(scores, manifest["bona_fide"].to_numpy(), spec["r_reject"])


@REMEDIES.register("oracle")
def _oracle(scores, manifest, spec) -> np.ndarray:
    return manifest["attack"].notna().to_numpy()


_oracle.ground_truth = True
