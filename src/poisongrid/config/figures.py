"""The figures the aggregate draws for a grid, named from the config alone, so the workflow can
declare each one (with its report caption) before it exists."""
from __future__ import annotations

import math

from ..errors import ConfigError
from .specs import CLEAN, cells, defense_applies


def swept_detectors(defenses) -> set[str]:
    """Detectors with >= 2 distinct r_reject values among 'remove' defenses, given (detector,
    remedy, r_reject) triples: those get an r_reject figure. The workflow's report list uses this too."""
    values: dict[str, set[float]] = {}
    for det, remedy, r in defenses:
        if remedy == "remove" and r is not None and not (isinstance(r, float) and math.isnan(r)):
            values.setdefault(det, set()).add(float(r))
    return {d for d, v in values.items() if len(v) >= 2}


def trajectory_detector_types(cfg: dict) -> set[str]:
    """Detector types that read a loss per epoch (their models' trajectories get a figure)."""
    from ..detectors import DETECTORS

    return {d["type"] for d in cfg["detectors"].values() if DETECTORS.get(d["type"]).per_epoch}


def capacity_swept(rows) -> bool:
    """Given (remedy, detector type, teacher architecture) of a dataset/scenario's defenses: do
    reweighting defenses on teacher losses use >= 2 teacher architectures (the LfD capacity figure)?"""
    return len({arch for remedy, dtype, arch in rows if remedy == "reweight" and dtype == "teacher_loss"}) >= 2


def model_of_path(path) -> tuple[str, str, int, str]:
    """(dataset, scenario, seed, model) of a defender model's loss file."""
    from ..paths import parse, pattern

    w = parse("losses", path)
    if w is None:
        raise ConfigError("defender model file", str(path), f"a path like {pattern('losses')}")
    return w["dataset"], w["scenario"], w["seed"], w["model"]


def figure_name(kind: str, dataset: str, scenario: str, seed: int | None = None, model: str | None = None) -> str:
    tail = f"_seed{seed}_{model}" if seed is not None else ""
    return f"fig_{kind}_{dataset}_{scenario}{tail}.png"


def single_multi_pairs(cfg: dict, dataset: str) -> list[tuple[str, str]]:
    """(defense, attack) pairs that ran both alone (single-<attack>) and in the multi scenario."""
    ds = cfg["datasets"][dataset]
    out = []
    if "multi" not in ds["scenarios"]:
        return out
    for name, d in cfg["defenses"].items():
        if not defense_applies(d, dataset, "multi"):
            continue
        out += [(name, a) for a in ds["attacks"] if f"single-{a}" in ds["scenarios"] and defense_applies(d, dataset, f"single-{a}")]
    return out


def figure_names(cfg: dict, trajectory_paths, teacher_paths) -> list[tuple[str, str, str, str]]:
    """(kind, file name, label, dataset) of every figure `poisongrid aggregate` draws for this config."""
    out = []
    pairs = list(dict.fromkeys((c["dataset"], c["scenario"]) for c in cells(cfg)))
    for ds, sc in pairs:
        if sc != CLEAN:
            out.append(("asr", figure_name("asr", ds, sc), f"{ds} — {sc}", ds))
        here = [d for d in cfg["defenses"].values() if defense_applies(d, ds, sc)]
        if swept_detectors((d.get("detector"), d["remedy"], d.get("r_reject")) for d in here):
            out.append(("rreject", figure_name("rreject", ds, sc), f"{ds} — {sc}", ds))
        rows = []
        for d in here:
            if d.get("detector"):
                det = cfg["detectors"][d["detector"]]
                if det.get("model"):
                    arch = cfg["defender_models"][det["model"]].get("model", cfg["datasets"][ds]["model"])
                    rows.append((d["remedy"], det["type"], arch))
        if capacity_swept(rows):
            out.append(("capacity", figure_name("capacity", ds, sc), f"{ds} — {sc}", ds))
    for ds in dict.fromkeys(ds for ds, _ in pairs):
        scenarios = {sc for d, sc in pairs if d == ds}
        which = "multi" if "multi" in scenarios else ("single" if any(s.startswith("single-") for s in scenarios) else None)
        if which:
            out.append(("headline", figure_name("headline", ds, which), ds, ds))
        if single_multi_pairs(cfg, ds):
            out.append(("singlemulti", figure_name("singlemulti", ds, "all"), ds, ds))
    for kind, paths in (("trajectories", trajectory_paths), ("teacher", teacher_paths)):
        for p in paths:
            ds, sc, seed, m = model_of_path(p)
            out.append((kind, figure_name(kind, ds, sc, seed, m), f"{ds} — {sc}, seed {seed}, {m}", ds))
    return out
