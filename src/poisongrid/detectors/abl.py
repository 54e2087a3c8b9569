"""Anti-Backdoor Learning's isolation (Li et al. 2021): the loss under a model trained a few epochs
with a loss floor (flooding or LGA); the lowest losses are the isolated, suspicious examples."""
from __future__ import annotations

from .base import DETECTORS
from .teacher import TeacherLoss


@DETECTORS.register("abl")
class ABLIsolation(TeacherLoss):
    """ABL's isolation: score = -(each example's loss under the isolation model after its last
    epoch), so the examples learned fastest under the loss floor rank as most suspicious.

    The scoring rule is exactly the teacher loss's (a model's final per-example loss, negated);
    what makes it ABL is the defender model it reads, `isolation` by default, trained with
    `objective: flooding_example` (BaDLoss's adaptation: 10 epochs, per-example flooding at 0.5) or
    `objective: lga` (ABL's code: local gradient ascent on the batch mean, gamma 0.5), with
    `record: final`. Deviations: the losses come from the pretrain stage's eval-mode pass without
    augmentation (as the ABL code isolates; the BaDLoss code ranks one random augmented view), in
    batches rather than ABL's batch size 1 (identical in eval mode); the training loop's cosine
    schedule spans the isolation model's `epochs` where ABL and BaDLoss keep the lr constant
    (`r_epoch` instead makes it span the dataset's run: r_epoch 1/3 ends at 0.75 of the lr).
    Pair it with the `remove` remedy (r_reject 0.15, BaDLoss) or the `unlearn` remedy
    (r_isolate 0.01, ABL)."""

    type = "abl"
    default_model = "isolation"
