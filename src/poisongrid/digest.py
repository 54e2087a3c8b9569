"""Digests of an artifact's content, recorded in its metadata when it is written and checked by
every reader, so a file changed after it was written (a hand edit, another tool, a bad disk) is
refused by name instead of being used.

Parquet columns are digested one by one (a reader of some columns checks those) and streamably
(a reader of batches checks each column at its end), in a canonical form that does not depend on
how the columns are chunked: fixed-width values without nulls as their bytes, anything else value
by value. BLAKE2b (benchmarks/digests.py: 1e6 x 30 float32 trajectories hash in about 0.4 s)."""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np

from .errors import ArtifactError

if TYPE_CHECKING:
    import pyarrow as pa

DIGEST_KEY = "digests"  # where a Parquet file's per-column digests sit in its metadata
JSON_DIGEST_KEY = "digest"  # a JSON document's or a model file's one digest


def _new(label: str):
    h = hashlib.blake2b(digest_size=16)
    h.update(label.encode())
    return h


class ColumnDigest:
    """The digest of one Arrow column, fed batch by batch (the same whatever the batches)."""

    def __init__(self, name: str, type_: pa.DataType):
        self._h = _new(f"{name}:{type_}")

    def update(self, arr) -> None:
        import pyarrow as pa

        from .arrow import to_numpy

        chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
        for a in chunks:
            fixed = pa.types.is_integer(a.type) or pa.types.is_floating(a.type) or pa.types.is_boolean(a.type)
            if fixed and a.null_count == 0:
                v = to_numpy(a)
                self._h.update((v.astype(np.uint8) if v.dtype == bool else np.ascontiguousarray(v)).tobytes())
            else:
                for x in a.to_pylist():
                    b = b"\x00" if x is None else b"\x01" + json.dumps(x, default=str).encode()
                    self._h.update(len(b).to_bytes(8, "little") + b)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def table_digests(table: pa.Table) -> dict[str, str]:
    out = {}
    for name in table.column_names:
        d = ColumnDigest(name, table.schema.field(name).type)
        d.update(table.column(name))
        out[name] = d.hexdigest()
    return out


def check_table(path, table: pa.Table, meta: dict) -> None:
    """Refuse a table whose columns differ from the digests its metadata recorded (files written
    before digests were recorded have none and pass)."""
    want = meta.get(DIGEST_KEY)
    if not want:
        return
    got = table_digests(table)
    bad = sorted(c for c in got if c in want and want[c] != got[c])
    if bad:
        raise changed(path, f"column(s) {bad}")


def changed(path, what: str) -> ArtifactError:
    return ArtifactError(f"{path}: {what} changed after the file was written (its content no longer matches the "
                         "digest recorded in it); delete it and rerun the stage that makes it")


def array_digest(name: str, a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    h = _new(f"{name}:{a.dtype.str}:{a.shape}")
    h.update(a.tobytes() if a.dtype.kind != "O" else repr(a.tolist()).encode())
    return h.hexdigest()


def arrays_digests(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {k: array_digest(k, np.asarray(v)) for k, v in arrays.items()}


def tensors_digest(state: dict) -> str:
    """One digest of a model's state dict (names, dtypes, shapes and values, in name order)."""
    import torch

    h = _new("state_dict")
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def json_digest(obj: dict) -> str:
    """The digest of a JSON document without its own digest field."""
    h = _new("json")
    h.update(json.dumps({k: v for k, v in obj.items() if k != JSON_DIGEST_KEY}, sort_keys=True, default=str).encode())
    return h.hexdigest()
