"""Remedies: turn a detector's scores into a plan of per-example weights, and train the final model
from it. One module per remedy family; each registers itself in REMEDIES on import."""
from .base import REMEDIES, FinalTraining, Remedy, select_removed
from .standard import lfd_weights
from . import flagged, standard, unlearn  # noqa: F401  (registration)

# Remedies that need torch are imported when a config first names them.
for _name, _module in {"cbd": "cbd", "fine_prune": "fine_pruning", "pss_unlearn": "pss"}.items():
    REMEDIES.lazy(_name, f"{__name__}.{_module}")

__all__ = ["REMEDIES", "FinalTraining", "Remedy", "lfd_weights", "select_removed"]
