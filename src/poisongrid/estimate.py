"""What a grid will cost before it runs: its jobs per stage and their GPU time, from each dataset's
`minutes_per_epoch` and each defender model's, detector's and remedy's work in epochs."""
from __future__ import annotations

from . import config, jobs

GPU_MINUTE_STAGES = ("trigger", "pretrain", "features", "score", "train")
# What a GPU job costs beyond its epochs: the first epoch ran 7-10 s longer than the others on an
# H200 (cuDNN's kernel timing, the graph capture), plus an allowance for the process's start, CUDA's
# initialisation and loading the data (not measured separately).
GPU_JOB_START_MINUTES = 0.3


def grid_jobs(cfg: dict) -> list[tuple[str, dict]]:
    """Every job of the grid once (a defender model or score shared by several defenses once per cell)."""
    seen, out = set(), []
    per_cell: dict[tuple, list[str]] = {}
    for c in config.cells(cfg):
        per_cell.setdefault((c["dataset"], c["scenario"], c["seed"]), []).append(c["defense"])
    for (ds, sc, seed), defenses in per_cell.items():
        for stage, job in jobs.cell_jobs(cfg, ds, sc, seed, defenses):
            key = (stage, tuple(sorted(job.items())))
            if key not in seen:
                seen.add(key)
                out.append((stage, job))
    return out


def estimate(cfg: dict) -> list[dict]:
    """One row per (dataset, stage, what): jobs and GPU hours (CPU-only stages count 0)."""
    rows: dict[tuple, dict] = {}
    for stage, job in grid_jobs(cfg):
        what = job.get("model") or job.get("detector") or job.get("defense") or job.get("attack") or ""
        minutes = 0.0
        if stage in GPU_MINUTE_STAGES and (stage != "score" or _gpu_detector(cfg, what)):
            kw = {"model": job.get("model")} if stage in ("pretrain", "features") else {}
            if stage == "score":
                kw = {"detector": what}
            elif stage == "trigger":
                kw = {"attack": what}
            elif stage == "train":
                kw = {"defense": what}
            minutes = config.estimated_minutes(cfg, stage, job["dataset"], **kw) + GPU_JOB_START_MINUTES
        r = rows.setdefault((job["dataset"], stage, what), {"dataset": job["dataset"], "stage": stage, "what": what,
                                                            "jobs": 0, "gpu_hours": 0.0})
        r["jobs"] += 1
        r["gpu_hours"] += minutes / 60
    return list(rows.values())


def _gpu_detector(cfg: dict, name: str) -> bool:
    from .detectors import DETECTORS

    return DETECTORS.get(cfg["detectors"][name]["type"]).gpu


def rates(cfg: dict) -> dict[str, str]:
    """Per dataset, the minutes per epoch the estimate rests on and where they come from."""
    out = {}
    for ds in cfg["datasets"]:
        mpe, eager, source = config.epoch_minutes(cfg, ds)
        out[ds] = f"{_minutes(mpe)} per epoch ({_minutes(eager)} eager), {source}"
    return out


def _minutes(m: float) -> str:
    return f"{m:.3g} min" if m >= 0.01 else f"{m * 60:.2g} s"


def render(rows: list[dict], rates: dict[str, str] | None = None) -> str:
    """Per dataset: each stage's jobs and GPU hours, the GPU-heavy items named, and the total."""
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        here = [r for r in rows if r["dataset"] == ds]
        out.append(f"{ds}: {sum(r['jobs'] for r in here)} jobs, {sum(r['gpu_hours'] for r in here):.1f} GPU-h"
                   + (f"  [{rates[ds]}]" if rates and ds in rates else ""))
        for stage in dict.fromkeys(r["stage"] for r in here):
            st = [r for r in here if r["stage"] == stage]
            items = ", ".join(f"{r['what']} {r['gpu_hours']:.1f}" for r in sorted(st, key=lambda r: -r["gpu_hours"])
                              if r["gpu_hours"] >= 0.05)
            out.append(f"  {stage:<9} {sum(r['jobs'] for r in st):>5} jobs {sum(r['gpu_hours'] for r in st):>8.1f} GPU-h"
                       + (f"  ({items})" if items else ""))
    total_jobs = sum(r["jobs"] for r in rows)
    out.append(f"total: {total_jobs} jobs (+ aggregate), {sum(r['gpu_hours'] for r in rows):.1f} GPU-h")
    return "\n".join(out)
