"""The detector contract: a registered class per detector type, which reads the defender's view
of a cell (defender.DefenderView) and writes one scores file."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..errors import ConfigError
from ..io import META_KEY, atomic_path, from_numpy, read_table
from ..registry import Registry

if TYPE_CHECKING:
    from ..defender import BonaFideSet, DefenderView

DETECTORS: Registry = Registry("detector type", "poisongrid.detectors")
SCORES_KIND = "scores"


class Detector:
    """`needs`: what score() reads besides the defender's view of the manifest:
    `trajectories`, `features`, `weights` (artifacts of the defender model named by the config's
    `model` key) and `images` (the cell's poisoned training set). `default_model`: the defender
    model read when the config names none (None: the detector reads no model). `min_epochs`:
    fewest recorded loss epochs it can work with. `gpu`: it trains or optimises on the training
    device (its score job asks the scheduler for a GPU). `cost_epochs`: its work in epochs of the
    dataset's training, for the scheduler's time limit. `min_bona_fide`: how many bona fide
    examples it needs at least (0: none)."""

    type: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]
    default_model: ClassVar[str | None]
    params: ClassVar[dict] = {}
    # Scores are negated per-example losses (loss = -score), so a remedy that weighs by loss
    # (LfD's Eq. 6) can use them exactly.
    negated_loss: ClassVar[bool] = False
    per_epoch: ClassVar[bool] = False
    gpu: ClassVar[bool] = False
    cost_epochs: ClassVar[float] = 0.0
    min_bona_fide: ClassVar[int] = 0
    cell: dict | None = None  # what the scores are for, recorded in their metadata
    view: "DefenderView | None" = None  # what the defender has of the cell, set by the score stage

    def __init__(self, **params):
        self.p = {**self.params, **params}

    @classmethod
    def reads_data(cls) -> bool:
        """Whether score() loads images or a model (its spec then carries the dataset and runtime)."""
        return bool({"images", "weights"} & set(cls.needs))

    @classmethod
    def check(cls, det: dict, key: str, cfg: dict, bona: BonaFideSet) -> None:
        """Check a detector entry; `cfg` is the grid's config (its defender models), `bona` the
        bona fide set the entry reads."""
        allowed = (["model"] if cls.default_model else []) + ["bona_fide"] + list(cls.params)
        for k in det:
            if k != "type" and k not in allowed:
                raise ConfigError(f"{key}.{k}", det[k], f"one of {sorted(allowed)}")
        for k, default in cls.params.items():
            v = det.get(k, default)
            if isinstance(default, bool) and not isinstance(v, bool):
                raise ConfigError(f"{key}.{k}", v, "true or false")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"{key}.{k}", v, "an integer" if isinstance(default, int) else "a number")
            if isinstance(default, str) and not isinstance(v, str):
                raise ConfigError(f"{key}.{k}", v, "a string")
        if bona.n_clean < cls.min_bona_fide:
            raise ConfigError(f"{bona.key}.n_clean", bona.n_clean, f"at least {cls.min_bona_fide}: detector "
                              f"'{key.split('.')[-1]}' ({cls.type}) learns from the bona fide examples")
        if not cls.default_model:
            return
        model = det.get("model", cls.default_model)
        models = cfg["defender_models"]
        if model not in models:
            raise ConfigError(f"{key}.model", model, f"one of the defender models {sorted(models)}")
        if cls.per_epoch and models[model].get("record", "final") == "final":
            raise ConfigError(f"defender_models.{model}.record", "final",
                              f"'eval' or 'train': detector '{key.split('.')[-1]}' ({cls.type}) reads a loss per epoch")

    @staticmethod
    def positive(key: str, v, integer: bool = False, upper: float | None = None) -> None:
        """Range check for a numeric parameter: > 0 (an integer if asked), <= upper if given."""
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and (not integer or isinstance(v, int))
        if ok and upper is not None:
            ok = v <= upper
        if not ok:
            what = "a positive integer" if integer else "a positive number"
            raise ConfigError(key, v, what + (f" at most {upper:g}" if upper is not None else ""))

    @classmethod
    def epochs(cls, det: dict, data: dict) -> float:
        """Its GPU work in epochs of the dataset's training, for scheduler limits and cost estimates;
        `data`: num_classes, n_train, n_clean, epochs of the dataset."""
        return cls.cost_epochs

    def score(self, out_path) -> dict:
        """Score every example of `self.view` and write them with `ScoreWriter(out_path, meta,
        self.view)`; return the metadata written."""
        raise NotImplementedError


class ScoreWriter:
    """Stream (index, score) blocks into a poisongrid scores Parquet file, atomically, once. The
    metadata goes into the footer at close, with the detector's wall time counted from when its
    view was made (a detector may optimise for minutes before it opens the writer) and the
    defender model it read through the view."""

    def __init__(self, path, meta: dict, view: "DefenderView | None" = None):
        import pyarrow as pa

        self.meta = meta
        self.view = view
        self.schema = pa.schema([("index", pa.int64()), ("score", pa.float64())])
        self._ctx = atomic_path(path)
        self._t0 = view.started if view is not None else time.perf_counter()

    def __enter__(self):
        import pyarrow.parquet as pq

        from ..digest import ColumnDigest

        self._tmp = self._ctx.__enter__()
        self._w = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self._digests = {f.name: ColumnDigest(f.name, f.type) for f in self.schema}
        return self

    def write(self, index: np.ndarray, score: np.ndarray) -> None:
        import pyarrow as pa

        block = pa.table({"index": from_numpy(index.astype(np.int64)), "score": from_numpy(score.astype(np.float64))},
                         schema=self.schema)
        for name, d in self._digests.items():
            d.update(block.column(name))
        self._w.write_table(block)

    def __exit__(self, *exc):
        import json

        self.meta["wall_time_s"] = time.perf_counter() - self._t0
        if not self.meta.get("defender_model") and self.view is not None and self.view.model_meta:
            self.meta["defender_model"] = self.view.model_meta
        from ..digest import DIGEST_KEY

        self.meta[DIGEST_KEY] = {name: d.hexdigest() for name, d in self._digests.items()}
        self._w.add_key_value_metadata({META_KEY: json.dumps({"kind": SCORES_KIND, **self.meta}, default=str).encode()})
        self._w.close()
        return self._ctx.__exit__(*exc)


def read_scores(path):
    table, meta = read_table(path, SCORES_KIND, require=("index", "score"))
    return table.to_pandas(), meta
