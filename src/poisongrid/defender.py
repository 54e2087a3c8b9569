"""The defender's view of a cell: what a real defender has, and nothing else.

Detectors and remedies receive one `DefenderView`: the training set as one set of images (the
poisoned rows already in place, with no record of which rows they are), the labels as trained on,
the bona fide flags, the defender models trained on that set (weights, features, loss
trajectories), the device, the cell's seed and the dataset's training settings; and, for a remedy
that asks for it, a held-out clean validation split of the test set. Not in it: the
clean originals, the poisoned rows' indices, the manifest's ground-truth columns, a dataset
handle, or any file path (a path leads to its neighbours, the manifest among them).

Within one Python process this is a boundary of the interface, not a sandbox: code that opens
files by name or digs into closures is not stopped, but nothing a plug-in is handed, followed
attribute by attribute, leads to the answer (tests/test_defender_view.py walks them)."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np


class BonaFideSet(NamedTuple):
    """The bona fide set a detector or defense reads, as the grid's config resolves it: its name,
    how many examples it holds, and the config key that sets that number (for error messages)."""

    name: str
    n_clean: int
    key: str


class DefenderImages:
    """The training images as one uint8 N x C x H x W set, indexable like an array (integer
    arrays, boolean masks, slices, a scalar). However the poisoned set is stored, the rows read
    the same and nothing here says which rows an attack changed."""

    __slots__ = ("_read", "_rows", "_item_shape")

    def __init__(self, read: Callable[[np.ndarray], np.ndarray], n: int, item_shape: tuple[int, ...],
                 rows: np.ndarray | None = None):
        self._read = read  # int64 row numbers -> their uint8 images (a new array)
        self._rows = np.arange(n, dtype=np.int64) if rows is None else rows
        self._item_shape = tuple(int(s) for s in item_shape)

    @classmethod
    def from_array(cls, images: np.ndarray) -> "DefenderImages":
        """A view of one array holding every training image (dense storage)."""
        return cls(lambda rows: np.array(images[rows]), len(images), images.shape[1:])

    @classmethod
    def overlay(cls, base: np.ndarray, index: np.ndarray, images: np.ndarray) -> "DefenderImages":
        """The clean set with the rows `index` (sorted) replaced by `images` (sparse storage),
        composed on every read without copying the clean set."""
        index = np.asarray(index, dtype=np.int64)

        def read(rows: np.ndarray) -> np.ndarray:
            out = np.array(base[rows])
            if len(index):
                pos = np.searchsorted(index, rows)
                hit = (pos < len(index)) & (index[np.minimum(pos, len(index) - 1)] == rows)
                out[hit] = images[pos[hit]]
            return out

        return cls(read, len(base), base.shape[1:])

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._rows), *self._item_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self._item_shape)

    @property
    def dtype(self):
        return np.dtype(np.uint8)

    @property
    def nbytes(self) -> int:
        return len(self._rows) * int(np.prod(self._item_shape))

    def subset(self, mask) -> "DefenderImages":
        return DefenderImages(self._read, 0, self._item_shape, self._rows[mask])

    def __getitem__(self, idx) -> np.ndarray:
        rows = self._rows[idx]
        if np.ndim(rows) == 0:
            return self._read(np.array([rows], dtype=np.int64))[0]
        return self._read(np.asarray(rows, dtype=np.int64))

    def materialize(self) -> np.ndarray:
        return self[np.arange(len(self._rows))]

    def __array__(self, dtype=None, copy=None):
        a = self.materialize()
        return a if dtype is None else a.astype(dtype)


class Trajectories:
    """One defender model's recorded per-example losses: its metadata and the losses in blocks."""

    __slots__ = ("meta", "_batches")

    def __init__(self, meta: dict, batches: Callable[..., Iterator[tuple[np.ndarray, np.ndarray]]]):
        self.meta = meta
        self._batches = batches

    def batches(self, rows: int = 1 << 18, epochs: list[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(index, losses) blocks of `rows` examples: the accepted epochs, or the recorded epochs
        numbered in `epochs`."""
        return self._batches(rows, epochs)


class DefenderView:
    """What a detector or remedy may read (see the module's docstring). Images, models, features
    and trajectories load on first use; `model_meta` records the defender model read, for the
    scores' metadata; `started` is when the view was made (a detector's wall time counts from it)."""

    def __init__(self, *, index: np.ndarray, labels: np.ndarray, bona_fide: np.ndarray, num_classes: int,
                 seed: int, training: dict | None = None, log: Callable[[str], None] | None = None,
                 images: Callable[[], DefenderImages] | None = None, device: Callable[[], Any] | None = None,
                 model: Callable[[], tuple[Any, dict]] | None = None,
                 features: Callable[[], tuple[np.ndarray, dict]] | None = None,
                 trajectories: Callable[[], Trajectories] | None = None,
                 validation: Callable[[], tuple[DefenderImages, np.ndarray]] | None = None):
        self.index = _frozen(np.asarray(index, dtype=np.int64))
        self.labels = _frozen(np.asarray(labels, dtype=np.int64))
        self.bona_fide = _frozen(np.asarray(bona_fide, dtype=bool))
        if not len(self.index) == len(self.labels) == len(self.bona_fide):
            raise ValueError("index, labels and bona_fide must have one entry per training example")
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self.training = dict(training or {})
        self.log = log or (lambda msg: None)
        self.model_meta: dict | None = None
        self.started = time.perf_counter()
        self._load = {"images": images, "device": device, "model": model, "features": features,
                      "trajectories": trajectories, "validation": validation}
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.index)

    def _get(self, key: str):
        if key not in self._cache:
            load = self._load.get(key)
            if load is None:
                raise ValueError(f"this defender's view holds no {key}: the detector or remedy does not declare it needs it")
            self._cache[key] = load()
        return self._cache[key]

    @property
    def images(self) -> DefenderImages:
        """The training images (poisoned rows in place), uint8 N x C x H x W."""
        return self._get("images")

    @property
    def device(self):
        return self._get("device") if self._load["device"] else _cpu()

    def model(self):
        """The defender model the config names, in eval mode on the device."""
        model, meta = self._get("model")
        self.model_meta = meta
        return model.eval()

    def features(self) -> np.ndarray:
        """The defender model's penultimate features of every training example (N, D)."""
        f, meta = self._get("features")
        self.model_meta = meta
        return f

    @property
    def trajectories(self) -> Trajectories:
        t = self._get("trajectories")
        self.model_meta = {k: t.meta.get(k) for k in ("model_name", "model", "wall_time_s", "record", "epochs_recorded",
                                                      "epochs_run")}
        return t

    def validation(self) -> tuple[DefenderImages, np.ndarray]:
        """Clean held-out images the attacked model never saw, with their labels (a seeded part of
        the test set that evaluation then leaves out; validation.py)."""
        return self._get("validation")

    def generator(self, *stream: int):
        """A torch generator seeded from the cell's seed and a stream number (one per use)."""
        import torch

        return torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, *stream]).generate_state(1)[0]))


def _frozen(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def _cpu():
    import torch

    return torch.device("cpu")


def model_record(meta: dict) -> dict:
    """What a scores file or a final model records of a saved defender model it read (from
    training.save_model's metadata): its name, architecture, wall time and epochs."""
    return {"model_name": meta.get("defender_model"), "model": meta.get("model"), "wall_time_s": meta.get("wall_time_s"),
            "epochs_run": meta.get("epochs")}
