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


def shuffle_ground_truth(man: pd.DataFrame, bona=None, seed: int = 1,
                         columns=("attack", "target", "orig_label")) -> pd.DataFrame:
    """`man` with its ground-truth columns permuted among the examples outside the bona fide set
    (`bona`, else man's bona_fide column): a manifest a stage still accepts (its bona fide examples
    stay untouched) whose answer is another."""
    bona = np.asarray(man["bona_fide"] if bona is None else bona, bool)
    rows = np.flatnonzero(~bona)
    perm = rows[np.random.default_rng(seed).permutation(len(rows))]
    out = man.copy()
    for c in columns:
        values = out[c].to_numpy().copy()
        values[rows] = man[c].to_numpy()[perm]
        out[c] = pd.array(values, dtype=man[c].dtype)
    assert (out["attack"].isna() != man["attack"].isna()).any()
    return out


def files(manifest_path) -> dict:
    """The stage inputs of a manifest written by write_manifest (its bona fide file beside it)."""
    p = Path(manifest_path)
    return {"manifest": p, "bona_fide": p.with_name(p.stem + ".bona_fide.parquet")}


def view(images=None, labels=None, bona_fide=None, model=None, seed=0, num_classes=None, training=None,
         features=None, index=None, validation=None):
    """A defender's view over in-memory data: what a detector or remedy receives from a stage."""
    import torch

    from poisongrid.defender import DefenderImages, DefenderView

    n = len(labels)
    loaders = {}
    if images is not None:
        loaders["images"] = lambda: images if isinstance(images, DefenderImages) else DefenderImages.from_array(np.asarray(images))
    if model is not None:
        loaders["model"] = lambda: (model, {"model_name": "planted"})
    if features is not None:
        loaders["features"] = lambda: (features, {"model_name": "planted"})
    if validation is not None:
        loaders["validation"] = lambda: (DefenderImages.from_array(np.asarray(validation[0])), np.asarray(validation[1]))
    return DefenderView(index=np.arange(n, dtype=np.int64) if index is None else np.asarray(index), labels=np.asarray(labels),
                        bona_fide=np.zeros(n, bool) if bona_fide is None else np.asarray(bona_fide, bool),
                        num_classes=int(num_classes if num_classes is not None else int(np.max(labels)) + 1), seed=seed,
                        training=training, device=lambda: torch.device("cpu"), **loaders)


def bona(cfg: dict | None = None, n_clean: int | None = None):
    """The default bona fide set as config checks hand it to a plug-in (its size from `cfg`'s
    bona_fide.n_clean, or `n_clean`)."""
    from poisongrid.defender import BonaFideSet

    n = n_clean if n_clean is not None else int(((cfg or {}).get("bona_fide") or {}).get("n_clean", 250))
    return BonaFideSet("default", n, "bona_fide")
