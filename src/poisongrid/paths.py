"""The artifact layout, shared by the Snakefile and the CLI."""
from __future__ import annotations

CELL = "{results}/{dataset}/{scenario}/seed{seed}"
PATTERNS = {
    "trigger": "{results}/{dataset}/triggers/{attack}-seed{seed}.npz",
    "manifest": CELL + "/poison/manifest.parquet",
    "poisoned": CELL + "/poison/poisoned.npz",
    "trajectories": CELL + "/pretrain/trajectories.parquet",
    "scores": CELL + "/scores/{detector}.parquet",
    "filter": CELL + "/{defense}/filter.parquet",
    "model": CELL + "/{defense}/model.pt",
    "metrics": CELL + "/{defense}/metrics.json",
}
# Directory names a defense may not take, since they sit beside the defense folders.
RESERVED = ("poison", "pretrain", "scores")


def path(kind: str, results: str = "results", **wildcards) -> str:
    return PATTERNS[kind].format(results=results, **wildcards)


def pattern(kind: str, results: str = "results") -> str:
    """The Snakemake pattern: every wildcard but the results root left in braces."""
    return PATTERNS[kind].replace("{results}", results)
