"""Run a stage job in-process from the config: the same spec and files Snakemake would give it.

For benchmarks and tests that drive a cell without Snakemake; the workflow itself runs each job
through the CLI."""
from __future__ import annotations

from . import config, paths
from .attacks import ATTACKS


def run_job(cfg: dict, stage: str, results: str, log=None, **cell) -> tuple[dict, dict, dict]:
    """Run one job; return (stage result, inputs, outputs)."""
    from . import stages

    if stage == "bonafide":
        cell = {"bona": paths.DEFAULT_BONA_FIDE, **cell}
    w = {k: cell[k] for k in ("scenario", "defense", "detector", "model", "attack", "bona") if k in cell}
    spec = config.stage_spec(cfg, stage, cell["dataset"], seed=cell.get("seed"), **w)
    inp = paths.inputs(stage, spec, results, **cell)
    out = paths.outputs(stage, results, **cell)
    kwargs = {"log": log} if log else {}
    return getattr(stages, stage)(spec, inp, out, **kwargs), inp, out


def cell_jobs(cfg: dict, dataset: str, scenario: str, seed: int, defenses: list[str]) -> list[tuple[str, dict]]:
    """The jobs one cell's defenses need, in an order that respects their dependencies."""
    c = {"dataset": dataset, "seed": seed}
    jobs: list[tuple[str, dict]] = []
    ds = cfg["datasets"][dataset]
    for a in config.scenario_attacks(ds, scenario):
        if ATTACKS.get(a).learns():
            jobs.append(("trigger", {**c, "attack": a}))
    c["scenario"] = scenario
    jobs.append(("poison", dict(c)))
    # The bona fide sets the defenses read: each one's detector's, else the default.
    sets = dict.fromkeys(config.bona_fide_of(cfg, defense=d) for d in defenses)
    jobs += [("bonafide", {**c, "bona": b}) for b in sets]
    from .detectors import DETECTORS

    models, feats, detectors = [], [], []
    for d in defenses:
        dd = cfg["defenses"][d]
        if paths.trains_nothing(dd):
            models.append(paths.ATTACKED)
        if dd.get("detector"):
            det = cfg["detectors"][dd["detector"]]
            needs = DETECTORS.get(det["type"]).needs
            if det.get("model"):
                models.append(det["model"])
                if "features" in needs:
                    feats.append(det["model"])
            detectors.append(dd["detector"])
        read = paths.STAGES["train"].inputs({"defense": dd}).get("weights")
        if read:
            models.append(read[1]["model"])
    jobs += [("pretrain", {**c, "model": m}) for m in dict.fromkeys(models)]
    jobs += [("features", {**c, "model": m}) for m in dict.fromkeys(feats)]
    jobs += [("score", {**c, "detector": d}) for d in dict.fromkeys(detectors)]
    for d in defenses:
        jobs.append(("plan", {**c, "defense": d}))
        if not paths.trains_nothing(cfg["defenses"][d]):
            jobs.append(("train", {**c, "defense": d}))
        jobs.append(("evaluate", {**c, "defense": d}))
    return jobs
