"""Spectral Signatures (Tran, Li, Madry 2018): per class, the squared projection of each centred
penultimate feature on the class's top singular direction (high = suspicious)."""
from __future__ import annotations

import numpy as np

from .base import DETECTORS, Detector, ScoreWriter


def spectral_tau(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared projection of each centred row on the top right singular vector of the centred
    matrix (float64), and the singular values (at most two, for the record)."""
    m = np.asarray(feats, dtype=np.float64)
    m = m - m.mean(0)
    _, s, vt = np.linalg.svd(m, full_matrices=False)
    return (m @ vt[0]) ** 2, s[:2]


@DETECTORS.register("spectral_signatures")
class SpectralSignatures(Detector):
    """Spectral Signatures as adapted by BaDLoss: the attacked model's penultimate features,
    grouped by the GIVEN label, every class treated; tau = ((R - mean) . v)^2 with v the top right
    singular vector of the centred class matrix (Algorithm 1 of the paper, not the official code's
    uncentred |v . R|).

    The method removes the top 1.5 * eps = 15% of EACH class, while remedies rank scores across all
    classes, where raw tau is not comparable. `per_class_rank: true` (default) scores each example
    by the rank quantile of tau in its class (rank / n, ties averaged; the most anomalous gets 1),
    so `remove` with r_reject 0.15 drops about 15% of every class; `false` gives raw tau. A class
    with fewer than 2 examples scores 0. Deviations: per-class floor(0.15 n) becomes a global
    top-15% of quantiles (equal up to rounding and ties across classes); the SVD is float64."""

    type = "spectral_signatures"
    needs = ("features",)
    default_model = "attacked"
    params = {"per_class_rank": True}

    def score(self, out_path) -> dict:
        from scipy.stats import rankdata  # here: a config check that names this detector never loads scipy

        feats, labels = self.view.features(), self.view.labels
        scores = np.zeros(len(labels), dtype=np.float64)
        classes = {}
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            if len(idx) < 2:
                classes[int(c)] = {"n": int(len(idx))}
                continue
            tau, s = spectral_tau(feats[idx])
            scores[idx] = rankdata(tau, method="average") / len(idx) if self.p["per_class_rank"] else tau
            classes[int(c)] = {"n": int(len(idx)), "singular_values": [float(v) for v in s]}
        meta = {"cell": self.cell, "detector": self.type, "params": self.p, "classes": classes,
                "feature_dim": int(feats.shape[1])}
        with ScoreWriter(out_path, meta, self.view) as w:
            w.write(self.view.index, scores)
        return meta
