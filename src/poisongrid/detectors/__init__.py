"""Detectors: give every training example an anomaly score (higher = more suspicious).

A detector reads the defender's view of its cell (defender.DefenderView): the training set's
labels and bona fide flags and what it declares in `needs` (a defender model's loss trajectories,
features or weights, the training images); never the ground truth. One module per detector; each
registers itself in DETECTORS on import."""
from .base import DETECTORS, SCORES_KIND, Detector, ScoreWriter, read_scores

from . import abl, badloss, teacher  # noqa: F401  (registration)

# Detectors that need torch or scikit-learn are imported when a config first names them.
for _type, _module in {"activation_clustering": "activation", "cbd": "cbd", "cognitive_distillation": "cognitive_distillation",
                       "frequency_analysis": "frequency",
                       "neural_cleanse": "neural_cleanse", "pss": "pss", "spectral_signatures": "spectral"}.items():
    DETECTORS.lazy(_type, f"{__name__}.{_module}")

__all__ = ["DETECTORS", "SCORES_KIND", "Detector", "ScoreWriter", "read_scores"]
