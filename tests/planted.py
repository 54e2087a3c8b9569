"""Writing planted cells the way the workflow does: a manifest and, beside it, its bona fide file."""
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from poisongrid import poisoning
from poisongrid.io import write_table

DEFAULT_CELL = {"dataset": "digits", "scenario": "multi", "seed": 0}


def write_manifest(path, man: pd.DataFrame, meta: dict | None = None, bona_fide_path=None) -> dict:
    """Write `man` (which may carry a `bona_fide` column) as a manifest plus its bona fide file
    (beside it unless `bona_fide_path`); return the stage inputs {"manifest": ..., "bona_fide": ...}."""
    path = Path(path)
    meta = dict(meta or {})
    meta.setdefault("cell", DEFAULT_CELL)
    bona = man["bona_fide"].to_numpy(bool) if "bona_fide" in man else np.zeros(len(man), bool)
    write_table(path, pa.Table.from_pandas(man.drop(columns=["bona_fide"], errors="ignore"), preserve_index=False),
                poisoning.MANIFEST_KIND, meta)
    bf = Path(bona_fide_path) if bona_fide_path else path.with_name(path.stem + ".bona_fide.parquet")
    poisoning.write_bona_fide(bf, man["index"].to_numpy(), bona,
                              {"cell": meta["cell"], "manifest_n": len(man), "manifest_fingerprint": poisoning.manifest_fingerprint(meta)})
    return {"manifest": path, "bona_fide": bf}


def files(manifest_path) -> dict:
    """The stage inputs of a manifest written by write_manifest (its bona fide file beside it)."""
    p = Path(manifest_path)
    return {"manifest": p, "bona_fide": p.with_name(p.stem + ".bona_fide.parquet")}
