"""BaDLoss: anomaly of each example's loss trajectory against the bona fide clean ones."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..knn import knn_log_distance
from .base import DETECTORS, Detector, ScoreWriter


@DETECTORS.register("badloss")
class BaDLoss(Detector):
    """BaDLoss (Alex et al., ICLR 2025): distance of each loss trajectory to its k nearest
    bona fide clean trajectories, s = log(mean distance + eps)."""

    type = "badloss"
    needs = ("trajectories",)
    default_model = "pretrain"
    per_epoch = True
    min_bona_fide = 1
    params = {"k": 50, "epsilon": 1e-8, "log_losses": False, "chunk_rows": 262144}

    @classmethod
    def check(cls, det: dict, key: str, cfg: dict, bona) -> None:
        super().check(det, key, cfg, bona)
        k = det.get("k", cls.params["k"])
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > bona.n_clean:
            raise ConfigError(f"{key}.k", k, f"an integer in [1, {bona.key}.n_clean = {bona.n_clean}]")
        if det.get("epsilon", 1e-8) <= 0:
            raise ConfigError(f"{key}.epsilon", det["epsilon"], "a positive number")
        rows = det.get("chunk_rows", cls.params["chunk_rows"])
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ConfigError(f"{key}.chunk_rows", rows, "a positive integer")

    def _transform(self, t: np.ndarray) -> np.ndarray:
        # Optional: compare log-losses, so low-loss attacks are not squashed against zero.
        return np.log(np.maximum(t, 1e-6)) if self.p["log_losses"] else t

    def score(self, out_path) -> dict:
        view = self.view
        traj = view.trajectories
        bona = view.index[view.bona_fide]
        k = int(self.p["k"])
        if k > len(bona):
            raise ConfigError("k", k, f"at most the number of bona fide examples ({len(bona)})")
        rows = self.p["chunk_rows"]
        # Pass 1 collects the few bona fide trajectories; pass 2 streams every row against them.
        ref = np.concatenate([t[np.isin(i, bona)] for i, t in traj.batches(rows)])
        ref = self._transform(ref)
        meta = {"cell": self.cell, "detector": self.type, "params": self.p, "epochs_used": traj.meta["accepted_epochs"],
                "n_bona_fide": len(ref)}
        with ScoreWriter(out_path, meta, view) as w:
            for idx, t in traj.batches(rows):
                w.write(idx, knn_log_distance(self._transform(t), ref, k, self.p["epsilon"]))
        return meta
