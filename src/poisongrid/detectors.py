"""Detectors: give every training example an anomaly score (higher = more suspicious).

A detector reads the artifacts it `needs` of one defender model (trained on the cell's poisoned
set, shared by every detector naming it) and, of the manifest, only the columns the defender
knows (`index`, `label`, `bona_fide`); never the ground truth `attack`."""
from __future__ import annotations

import os
import time
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
    """`needs`: the artifacts of the defender model named by the config's `model` key that score()
    reads (`trajectories`, `features`, `weights`), besides the defender's view of the manifest.
    `default_model`: the defender model read when the config names none. `min_epochs`: fewest
    recorded loss epochs the detector can work with."""

    type: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]
    default_model: ClassVar[str]
    params: ClassVar[dict] = {}
    # Scores are negated per-example losses (loss = -score), so a remedy that weighs by loss
    # (LfD's Eq. 6) can use them exactly.
    negated_loss: ClassVar[bool] = False
    per_epoch: ClassVar[bool] = False
    cell: dict | None = None  # what the scores are for, recorded in their metadata

    def __init__(self, **params):
        self.p = {**self.params, **params}

    @classmethod
    def check(cls, det: dict, key: str, cfg: dict) -> None:
        for k in det:
            if k not in ("type", "model") and k not in cls.params:
                raise ConfigError(f"{key}.{k}", det[k], f"one of {sorted(['model', *cls.params])}")
        for k, default in cls.params.items():
            v = det.get(k, default)
            if isinstance(default, bool) and not isinstance(v, bool):
                raise ConfigError(f"{key}.{k}", v, "true or false")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"{key}.{k}", v, "an integer" if isinstance(default, int) else "a number")
        model = det.get("model", cls.default_model)
        models = cfg["defender_models"]
        if model not in models:
            raise ConfigError(f"{key}.model", model, f"one of the defender models {sorted(models)}")
        if cls.per_epoch and models[model].get("record", "final") == "final":
            raise ConfigError(f"defender_models.{model}.record", "final",
                              f"'eval' or 'train': detector '{key.split('.')[-1]}' ({cls.type}) reads a loss per epoch")

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
    """Stream (index, score) blocks into a poisongrid scores Parquet file, atomically. The
    metadata goes into the footer at close, with the wall time the detector took."""

    def __init__(self, path, meta: dict):
        self.meta = meta
        self.schema = pa.schema([("index", pa.int64()), ("score", pa.float64())])
        self._ctx = atomic_path(path)
        self._t0 = time.perf_counter()

    def __enter__(self):
        self._tmp = self._ctx.__enter__()
        self._w = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        return self

    def write(self, index: np.ndarray, score: np.ndarray) -> None:
        self._w.write_table(pa.table({"index": index.astype(np.int64), "score": score.astype(np.float64)}, schema=self.schema))

    def __exit__(self, *exc):
        import json

        self.meta["wall_time_s"] = time.perf_counter() - self._t0
        self._w.add_key_value_metadata({META_KEY: json.dumps({"kind": SCORES_KIND, **self.meta}, default=str).encode()})
        self._w.close()
        return self._ctx.__exit__(*exc)


def read_scores(path):
    table, meta = read_table(path, SCORES_KIND, require=("index", "score"))
    return table.to_pandas(), meta


def _model_meta(tmeta: dict) -> dict:
    """What the score file records of the defender model it read (for wall times and provenance)."""
    return {k: tmeta.get(k) for k in ("model_name", "model", "wall_time_s", "record", "epochs_recorded")}


def _manifest_and_trajectories(paths: dict) -> tuple:
    """The defender's manifest and the trajectory file's metadata, after checking the file has one
    row per example (its own row count, not only what its metadata claims)."""
    from .io import table_meta

    man, _ = defender_manifest(paths["manifest"])
    pf, tmeta = table_meta(paths["trajectories"], trajectories.KIND)
    n, rows = len(man), pf.metadata.num_rows
    if tmeta.get("n_examples") != n or rows != n:
        raise ArtifactError(f"{paths['trajectories']}: has {rows} rows but the manifest has {n}; the two come from "
                            "different runs: delete it and rerun pretrain")
    return man, tmeta


@DETECTORS.register("badloss")
class BaDLoss(Detector):
    """BaDLoss (Alex et al., ICLR 2025): distance of each loss trajectory to its k nearest
    bona fide clean trajectories, s = log(mean distance + eps)."""

    type = "badloss"
    needs = ("trajectories",)
    default_model = "pretrain"
    per_epoch = True
    params = {"k": 50, "epsilon": 1e-8, "log_losses": False, "chunk_rows": 262144}

    @classmethod
    def check(cls, det: dict, key: str, cfg: dict) -> None:
        super().check(det, key, cfg)
        k = det.get("k", cls.params["k"])
        n_clean = cfg["bona_fide"]["n_clean"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > n_clean:
            raise ConfigError(f"{key}.k", k, f"an integer in [1, bona_fide.n_clean = {n_clean}]")
        if det.get("epsilon", 1e-8) <= 0:
            raise ConfigError(f"{key}.epsilon", det["epsilon"], "a positive number")
        rows = det.get("chunk_rows", cls.params["chunk_rows"])
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ConfigError(f"{key}.chunk_rows", rows, "a positive integer")

    def _transform(self, t: np.ndarray) -> np.ndarray:
        # Optional: compare log-losses, so low-loss attacks are not squashed against zero.
        return np.log(np.maximum(t, 1e-6)) if self.p["log_losses"] else t

    def score(self, paths: dict, out_path) -> dict:
        man, tmeta = _manifest_and_trajectories(paths)
        bona = set(man["index"][man["bona_fide"]].tolist())
        k = int(self.p["k"])
        if k > len(bona):
            raise ConfigError("k", k, f"at most the number of bona fide examples ({len(bona)})")
        rows = self.p["chunk_rows"]
        # Pass 1 collects the few bona fide trajectories; pass 2 streams every row against them.
        ref = np.concatenate([t[np.isin(i, list(bona))] for i, t in trajectories.iter_batches(paths["trajectories"], rows)])
        ref = self._transform(ref)
        meta = {"cell": self.cell, "detector": self.type, "params": self.p, "epochs_used": tmeta["accepted_epochs"], "n_bona_fide": len(ref),
                "defender_model": _model_meta(tmeta)}
        with ScoreWriter(out_path, meta) as w:
            for idx, t in trajectories.iter_batches(paths["trajectories"], rows):
                w.write(idx, knn_log_distance(self._transform(t), ref, k, self.p["epsilon"]))
        return meta


@DETECTORS.register("teacher_loss")
class TeacherLoss(Detector):
    """LfD (Learning from Distinction): each example's loss on a low-capacity teacher trained for
    a few epochs on the poisoned set; poisoned examples are learned first, so a LOW loss is
    suspicious. Score = -loss of the last recorded epoch."""

    type = "teacher_loss"
    needs = ("trajectories",)
    default_model = "teacher"
    negated_loss = True

    def score(self, paths: dict, out_path) -> dict:
        man, tmeta = _manifest_and_trajectories(paths)
        last = tmeta["epochs_recorded"] - 1
        meta = {"cell": self.cell, "detector": self.type, "params": self.p, "epoch_used": last, "negated_loss": True,
                "defender_model": _model_meta(tmeta)}
        with ScoreWriter(out_path, meta) as w:
            for idx, t in trajectories.iter_batches(paths["trajectories"], self.p.get("chunk_rows", 1 << 18), epochs=[last]):
                w.write(idx, -t[:, 0].astype(np.float64))
        return meta
