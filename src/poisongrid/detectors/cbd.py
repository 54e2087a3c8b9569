"""CBD's detection signal: the intentionally backdoored model's loss (low = suspicious)."""
from __future__ import annotations

from .base import DETECTORS
from .teacher import TeacherLoss


@DETECTORS.register("cbd")
class CBDLoss(TeacherLoss):
    """CBD (Zhang et al., CVPR 2023) has no detection step: it down-weights each example by
    w = l_B / (l_B + l_C), l_B the loss of a model B trained for a few epochs to capture the
    backdoor, l_C the clean model's loss during the final training (remedy `cbd`). Of that, what
    is fixed before the final training is l_B, so the score is -l_B after B's last epoch (low loss
    = suspicious): the same computation as LfD's teacher loss, read from the defender model
    `backdoored` (a plain model of the dataset's architecture, AdamW 1e-3, 5 epochs in BaDLoss)."""

    type = "cbd"
    default_model = "backdoored"
