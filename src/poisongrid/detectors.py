"""Detectors: give every training example an anomaly score (higher = more suspicious).

A detector sees the artifacts it names in `inputs` and, of the manifest, only the columns the
defender knows (`index`, `label`, `bona_fide`); never the ground truth `attack`."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import trajectories
from .errors import ArtifactError, ConfigError
from .io import META_KEY, atomic_path, read_table
from .registry import Registry

DETECTORS: Registry = Registry("detector type")
SCORES_KIND = "scores"
DEFENDER_COLUMNS = ["index", "label", "bona_fide"]


class Detector:
    type: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]]
    params: ClassVar[dict] = {}

    def __init__(self, **params):
        self.p = {**self.params, **params}

    @classmethod
    def check(cls, det: dict, key: str, cfg: dict) -> None:
        for k in det:
            if k != "type" and k not in cls.params:
                raise ConfigError(f"{key}.{k}", det[k], f"one of {sorted(cls.params)}")

    def score(self, paths: dict, out_path) -> dict:
        raise NotImplementedError


def defender_manifest(path):
    table, meta = read_table(path, "manifest", columns=DEFENDER_COLUMNS)
    return table.to_pandas(), meta


def knn_log_distance(x: np.ndarray, ref: np.ndarray, k: int, eps: float = 1e-8, chunk: int = 16384,
                     workers: int | None = None) -> np.ndarray:
    """log(eps + mean Euclidean distance to the k nearest rows of `ref`), for every row of `x`.

    float32 |x|^2 + |r|^2 - 2 x.r on data centred on the reference mean (centring keeps the
    cancellation error far below the distances), k smallest by partial sort, chunks spread over
    threads (BLAS and numpy's partition release the GIL). Memory: chunk x len(ref) per worker."""
    ref = np.asarray(ref, dtype=np.float32)
    if k > len(ref) or k < 1:
        raise ConfigError("k", k, f"an integer in [1, {len(ref)}] (the number of bona fide examples)")
    mu = ref.mean(0, dtype=np.float64).astype(np.float32)
    r = ref - mu
    rr = (r * r).sum(1)
    out = np.empty(len(x), dtype=np.float64)

    def run(s: int) -> None:
        xb = np.asarray(x[s:s + chunk], dtype=np.float32) - mu
        xx = (xb * xb).sum(1, keepdims=True)
        d2 = xb @ (-2.0 * r.T)
        d2 += rr
        d2 += xx
        near = np.partition(d2, k - 1, axis=1)[:, :k] if k < len(r) else d2
        # Below float32 resolution of |x|^2 + |r|^2 the true distance is 0 (e.g. a bona fide
        # example against itself); the rounding residue would otherwise add ~1e-3.
        near[near < 1e-6 * (xx + rr.max())] = 0.0
        out[s:s + chunk] = np.log(np.sqrt(near, dtype=np.float64).mean(1) + eps)

    starts = range(0, len(x), chunk)
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, starts))
    else:
        for s in starts:
            run(s)
    return out


class ScoreWriter:
    """Stream (index, score) blocks into a poisongrid scores Parquet file, atomically."""

    def __init__(self, path, meta: dict):
        import json

        self.schema = pa.schema([("index", pa.int64()), ("score", pa.float64())],
                                metadata={META_KEY: json.dumps({"kind": SCORES_KIND, **meta}).encode()})
        self._ctx = atomic_path(path)

    def __enter__(self):
        self._tmp = self._ctx.__enter__()
        self._w = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        return self

    def write(self, index: np.ndarray, score: np.ndarray) -> None:
        self._w.write_table(pa.table({"index": index.astype(np.int64), "score": score.astype(np.float64)}, schema=self.schema))

    def __exit__(self, *exc):
        self._w.close()
        return self._ctx.__exit__(*exc)


def read_scores(path):
    table, meta = read_table(path, SCORES_KIND)
    return table.to_pandas(), meta


@DETECTORS.register("badloss")
class BaDLoss(Detector):
    """BaDLoss (Alex et al., ICLR 2025): distance of each loss trajectory to its k nearest
    bona fide clean trajectories, s = log(mean distance + eps)."""

    type = "badloss"
    inputs = ("trajectories", "manifest")
    params = {"k": 50, "epsilon": 1e-8, "log_losses": False, "chunk_rows": 262144}

    @classmethod
    def check(cls, det: dict, key: str, cfg: dict) -> None:
        super().check(det, key, cfg)
        k = det.get("k", cls.params["k"])
        n_clean = cfg["bona_fide"]["n_clean"]
        if not isinstance(k, int) or k < 1 or k > n_clean:
            raise ConfigError(f"{key}.k", k, f"an integer in [1, bona_fide.n_clean = {n_clean}]")
        if det.get("epsilon", 1e-8) <= 0:
            raise ConfigError(f"{key}.epsilon", det["epsilon"], "a positive number")

    def _transform(self, t: np.ndarray) -> np.ndarray:
        # Optional: compare log-losses, so low-loss attacks are not squashed against zero.
        return np.log(np.maximum(t, 1e-6)) if self.p["log_losses"] else t

    def score(self, paths: dict, out_path) -> dict:
        man, _ = defender_manifest(paths["manifest"])
        tmeta = trajectories.meta(paths["trajectories"])
        if tmeta.get("n_examples") != len(man):
            raise ArtifactError(f"{paths['trajectories']} has {tmeta.get('n_examples')} rows but the manifest has {len(man)}")
        bona = set(man["index"][man["bona_fide"]].tolist())
        k = int(self.p["k"])
        if k > len(bona):
            raise ConfigError("k", k, f"at most the number of bona fide examples ({len(bona)})")
        rows = self.p["chunk_rows"]
        # Pass 1 collects the few bona fide trajectories; pass 2 streams every row against them.
        ref = np.concatenate([t[np.isin(i, list(bona))] for i, t in trajectories.iter_batches(paths["trajectories"], rows)])
        ref = self._transform(ref)
        meta = {"detector": self.type, "params": self.p, "epochs_used": tmeta["accepted_epochs"], "n_bona_fide": len(ref)}
        with ScoreWriter(out_path, meta) as w:
            for idx, t in trajectories.iter_batches(paths["trajectories"], rows):
                w.write(idx, knn_log_distance(self._transform(t), ref, k, self.p["epsilon"]))
        return meta
