"""Atomic writes and checked reads: a killed job never leaves a file a later stage trusts."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .arrow import to_numpy  # noqa: F401  (the readers' public name)
from .errors import ArtifactError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

# pyarrow is imported by the functions that read or write Parquet: config checks and the dataset
# loaders use this module's atomic writes only.

# Key under which poisongrid stores its own metadata in Parquet files.
META_KEY = b"poisongrid"


def write_failure(path, e: BaseException) -> ArtifactError:
    """One line saying which file could not be written and why (a full disk, a read-only folder)."""
    import errno
    import shutil

    text = str(e).strip()
    reason = getattr(e, "strerror", None) or (text.splitlines()[0][:200] if text else type(e).__name__)
    try:
        if shutil.disk_usage(Path(path).parent).free < (1 << 20):
            reason = os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return ArtifactError(f"{path}: could not be written ({reason}); nothing was left behind: free the space or fix the "
                         "folder, then rerun")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds. A
    failed write (a full disk, say) leaves nothing and is reported naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_failure(path, e) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            # mkstemp makes the file 0600; give it the mode a plain open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except OSError as e:
            raise write_failure(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, obj: dict) -> None:
    """A JSON document with the digest of its content (checked by read_json)."""
    from .digest import JSON_DIGEST_KEY, json_digest

    body = json.loads(json.dumps({k: v for k, v in obj.items() if k != JSON_DIGEST_KEY}, default=_json_default))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({**body, JSON_DIGEST_KEY: json_digest(body)}, indent=2, sort_keys=True) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path) -> dict:
    """A JSON document written by write_json, checked against its digest (returned without it)."""
    from .digest import JSON_DIGEST_KEY, changed, json_digest

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); delete it and rerun the stage that makes it") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path}: a JSON {type(obj).__name__}, not the mapping poisongrid writes; delete it and rerun "
                            "the stage that makes it")
    digest = obj.pop(JSON_DIGEST_KEY, None)
    if digest is not None and digest != json_digest(obj):
        raise changed(path, "its content")
    return obj


def write_table(path, table: pa.Table, kind: str, meta: dict | None = None, **kwargs) -> None:
    """Write a Parquet table tagged with `kind` so a reader can reject foreign files."""
    import pyarrow.parquet as pq

    from .digest import DIGEST_KEY, table_digests

    payload = {"kind": kind, **(meta or {}), DIGEST_KEY: table_digests(table)}
    md = dict(table.schema.metadata or {})
    md[META_KEY] = json.dumps(payload, default=_json_default).encode()
    table = table.replace_schema_metadata(md)
    kwargs.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


def table_meta(path, kind: str) -> tuple[pq.ParquetFile, dict]:
    """Open a Parquet file and check it is a poisongrid `kind` file; return it with its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: file not found")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(
            f"{path}: not a readable Parquet file (truncated or corrupt: {e}); delete it and rerun the stage that makes it"
        ) from None
    # The file footer's key-value metadata: it holds the schema's metadata and what a streaming
    # writer adds at close.
    md = pf.metadata.metadata or {}
    if META_KEY not in md:
        raise ArtifactError(f"{path}: Parquet file was not written by poisongrid (no '{META_KEY.decode()}' metadata); expected a {kind} file")
    meta = json.loads(md[META_KEY])
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path}: is a poisongrid '{meta.get('kind')}' file, expected '{kind}'")
    return pf, meta


def read_table(path, kind: str, columns: list[str] | None = None, require: tuple[str, ...] = ()) -> tuple[pa.Table, dict]:
    import pyarrow as pa

    pf, meta = table_meta(path, kind)
    missing = [c for c in (*require, *(columns or ())) if c not in pf.schema_arrow.names]
    if missing:
        raise ArtifactError(f"{path}: lacks the columns {missing} of a {kind} file; delete it and rerun the stage that makes it")
    try:
        table = pf.read(columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(f"{path}: Parquet data unreadable ({e}); delete it and rerun the stage that makes it") from None
    from .digest import check_table

    check_table(path, table, meta)
    return table, meta


# pyarrow's own conversions (Array.to_numpy, pa.array(ndarray)) import pandas whenever it is
# installed: 0.2 s on an idle node, more on a busy one, most of a light job's start. These two
# cross through the arrays' buffers instead, for the columns the light jobs read and write
# (integers, floats, booleans, no nulls); anything else takes pyarrow's general path.


def from_numpy(x: np.ndarray) -> pa.Array:
    """A 1-D numeric or boolean numpy array as an Arrow array (a copy)."""
    import pyarrow as pa

    x = np.ascontiguousarray(x)
    if x.ndim != 1 or x.dtype.kind not in "biuf":
        return pa.array(x)
    if x.dtype == bool:
        return pa.Array.from_buffers(pa.bool_(), len(x), [None, pa.py_buffer(np.packbits(x, bitorder="little"))])
    return pa.Array.from_buffers(pa.from_numpy_dtype(x.dtype), len(x), [None, pa.py_buffer(x.copy())])


def string_array(values) -> pa.Array:
    """Strings (None: null) as an Arrow large_string array, built from its buffers."""
    import pyarrow as pa

    valid = np.fromiter((v is not None for v in values), bool, len(values))
    encoded = [v.encode() if v is not None else b"" for v in values]
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(values)), out=offsets[1:])
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.large_string(), len(values), [bitmap, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))],
                                 null_count=int(len(values) - valid.sum()))


# The .npz entry holding the other arrays' digests (JSON), checked by load_npz.
NPZ_DIGESTS = "_digests"


def save_npz(path, **arrays) -> None:
    from .digest import arrays_digests

    digests = json.dumps(arrays_digests(arrays))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays, **{NPZ_DIGESTS: np.array(digests)})


def load_npz(path, keys: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays of an .npz (never unpickling anything); `keys` must be among them."""
    import zipfile

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ArtifactError(f"{path}: not a readable .npz file ({e}); delete it and rerun the stage that makes it") from None
    digests = out.pop(NPZ_DIGESTS, None)
    if digests is not None:
        from .digest import arrays_digests, changed

        want = json.loads(str(digests))
        got = arrays_digests(out)
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        if bad:
            raise changed(path, f"array(s) {bad}")
    missing = [k for k in keys if k not in out]
    if missing:
        raise ArtifactError(f"{path}: lacks the arrays {missing} (has {sorted(out)}); not a file of this stage, "
                            "delete it and rerun the stage that makes it")
    return out


def fingerprint(spec: dict, *files) -> str:
    """Digest of a stage's settings and its input files' contents: what a checkpoint must match."""
    import hashlib

    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=_json_default).encode())
    for f in files:
        if f is None:
            continue
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


FEATURES_KIND = "features"


def save_features(path, features: np.ndarray, meta: dict) -> None:
    """Penultimate features (float32 N x D) with their metadata (kind, cell) as JSON beside them."""
    save_npz(path, features=features.astype(np.float32),
             meta=np.array(json.dumps({"kind": FEATURES_KIND, **meta}, default=_json_default)))


def load_features(path) -> tuple[np.ndarray, dict]:
    z = load_npz(path, keys=("features", "meta"))
    meta = json.loads(str(z["meta"]))
    if meta.get("kind") != FEATURES_KIND:
        raise ArtifactError(f"{path}: a {meta.get('kind')!r} file, expected a {FEATURES_KIND} file")
    return z["features"], meta
