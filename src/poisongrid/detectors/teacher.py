"""LfD's teacher loss: a low-capacity model's loss after a few epochs (low = suspicious)."""
from __future__ import annotations

import numpy as np

from .base import DETECTORS, Detector, ScoreWriter


@DETECTORS.register("teacher_loss")
class TeacherLoss(Detector):
    """LfD (Learning from Distinction): each example's loss on a low-capacity teacher trained for
    a few epochs on the poisoned set; poisoned examples are learned first, so a LOW loss is
    suspicious. Score = -loss of the last recorded epoch."""

    type = "teacher_loss"
    needs = ("trajectories",)
    default_model = "teacher"
    negated_loss = True

    def score(self, out_path) -> dict:
        traj = self.view.trajectories
        last = traj.meta["epochs_recorded"] - 1
        meta = {"cell": self.cell, "detector": self.type, "params": self.p, "epoch_used": last, "negated_loss": True}
        with ScoreWriter(out_path, meta, self.view) as w:
            for idx, t in traj.batches(self.p.get("chunk_rows", 1 << 18), epochs=[last]):
                w.write(idx, -t[:, 0].astype(np.float64))
        return meta
