"""Remedies: turn a detector's scores into a plan of per-example weights, and train the final model
from it. One module per remedy family; each registers itself in REMEDIES on import."""
from .base import REMEDIES, FinalTraining, Remedy, select_removed
from .standard import lfd_weights
from . import standard, unlearn  # noqa: F401  (registration)

__all__ = ["REMEDIES", "FinalTraining", "Remedy", "lfd_weights", "select_removed"]
