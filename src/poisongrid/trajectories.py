"""Trajectory files: one row per training example, one float32 column per recorded epoch."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from .errors import ArtifactError
from .io import read_table, table_meta, to_numpy, write_table

KIND = "trajectories"


def column(epoch: int) -> str:
    return f"loss_e{epoch:03d}"


def accepted_epochs(epoch_means: list[float], factor: float = 2.0, rule: str = "paper") -> list[int]:
    """Epochs kept for the trajectories, given each epoch's mean training loss (loss spikes in
    multi-attack training). paper (footnote 4 and Algorithm 1): every epoch is checked; it is skipped
    when its mean exceeds `factor` x the mean of the last three kept (the first has no history and
    is kept). reference (the authors' code): epochs 0-2 always kept, the same test after that."""
    if rule not in ("paper", "reference"):
        raise ValueError(f"spike rule {rule!r}: 'paper' or 'reference'")
    kept: list[int] = []
    for e, m in enumerate(epoch_means):
        free = 1 if rule == "paper" else 3
        if len(kept) < free or m <= factor * float(np.mean([epoch_means[k] for k in kept[-3:]])):
            kept.append(e)
    return kept


def write(path, losses: np.ndarray, meta: dict) -> None:
    """losses: (epochs, N). Stored transposed: row i is example i's trajectory."""
    n_ep, n = losses.shape
    cols = {"index": pa.array(np.arange(n, dtype=np.int64))}
    for e in range(n_ep):
        cols[column(e)] = pa.array(losses[e].astype(np.float32))
    # Loss values are not repetitive, so dictionary encoding only costs; byte-stream-split helps zstd on floats.
    write_table(path, pa.table(cols), KIND, meta, use_dictionary=False,
                use_byte_stream_split=[column(e) for e in range(n_ep)], row_group_size=1 << 20)


def meta(path) -> dict:
    return table_meta(path, KIND)[1]


def read(path, only_accepted: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Return (index, trajectories (N, T) float32, metadata)."""
    _, md = table_meta(path, KIND)
    cols = _columns(md, only_accepted)
    table, md = read_table(path, KIND, columns=["index", *cols])
    return to_numpy(table.column("index")), _matrix(table, cols), md


def iter_batches(path, batch_rows: int = 1 << 18, only_accepted: bool = True,
                 epochs: list[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (index, trajectories) blocks so a file larger than memory can be scored; `epochs`
    picks recorded epochs by number instead of the accepted ones."""
    from .digest import DIGEST_KEY, ColumnDigest, changed

    pf, md = table_meta(path, KIND)
    cols = [column(e) for e in epochs] if epochs is not None else _columns(md, only_accepted)
    want = md.get(DIGEST_KEY) or {}
    digests = {c: ColumnDigest(c, pf.schema_arrow.field(c).type) for c in ["index", *cols] if c in want}
    try:
        for b in pf.iter_batches(batch_size=batch_rows, columns=["index", *cols]):
            for c, d in digests.items():
                d.update(b.column(c))
            t = _matrix(b, cols)
            if not np.isfinite(t).all():
                raise ArtifactError(f"{path}: holds {int((~np.isfinite(t)).sum())} non-finite losses (NaN or inf) in "
                                    f"the epochs read; a loss trajectory is finite: delete it and rerun pretrain")
            yield to_numpy(b.column("index")), t
    except (pa.ArrowInvalid, OSError) as e:
        raise ArtifactError(f"{path}: Parquet data unreadable ({e}); delete it and rerun pretrain") from None
    bad = sorted(c for c, d in digests.items() if d.hexdigest() != want[c])
    if bad:
        raise changed(path, f"column(s) {bad}")


def _columns(md: dict, only_accepted: bool) -> list[str]:
    epochs = md["accepted_epochs"] if only_accepted else list(range(md["epochs_recorded"]))
    return [column(e) for e in epochs]


def _matrix(table, cols: list[str]) -> np.ndarray:
    return np.stack([to_numpy(table.column(c)) for c in cols], axis=1).astype(np.float32, copy=False) if cols \
        else np.zeros((table.num_rows, 0), dtype=np.float32)
