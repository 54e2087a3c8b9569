"""The artifact layout, the rules' logs and each stage's inputs and outputs, declared once.

The Snakefile's rules and the CLI's default paths both come from `STAGES`: a stage's outputs are
fixed artifact kinds; its inputs are a function of the stage's spec (the part of the config the
stage depends on), e.g. which defender model a detector reads or which learned triggers a
scenario needs. No other module builds a path."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

CELL = "{results}/{dataset}/{scenario}/seed{seed}"
PATTERNS = {
    "trigger": "{results}/{dataset}/triggers/{attack}-seed{seed}.npz",
    "manifest": CELL + "/poison/manifest.parquet",
    "poisoned": CELL + "/poison/poisoned.npz",
    # One file per bona fide set: `default` (the config's `bona_fide`) and each of `bona_fide_sets`.
    "bona_fide": CELL + "/bona_fide/{bona}.parquet",
    "defender_model": CELL + "/models/{model}/model.pt",
    "losses": CELL + "/models/{model}/trajectories.parquet",
    "features": CELL + "/models/{model}/features.npz",
    "scores": CELL + "/scores/{detector}.parquet",
    "plan": CELL + "/{defense}/plan.parquet",
    "final_model": CELL + "/{defense}/model.pt",
    "metrics": CELL + "/{defense}/metrics.json",
    "summary": "{results}/summary.csv",
}
# Each rule's log (Snakemake's `log:`), under the logs root; `poisongrid status` reads them.
LOG_CELL = "{logs}/{stage}/{dataset}/{scenario}/seed{seed}"
LOGS = {
    "trigger": "{logs}/trigger/{dataset}/{attack}-seed{seed}.log",
    "poison": LOG_CELL + ".log",
    "bonafide": LOG_CELL + "/{bona}.log",
    "pretrain": LOG_CELL + "/{model}.log",
    "features": LOG_CELL + "/{model}.log",
    "score": LOG_CELL + "/{detector}.log",
    "plan": LOG_CELL + "/{defense}.log",
    "train": LOG_CELL + "/{defense}.log",
    "evaluate": LOG_CELL + "/{defense}.log",
    "aggregate": "{logs}/aggregate/aggregate.log",
}
WILDCARDS = ("dataset", "scenario", "seed", "attack", "model", "detector", "defense", "bona")
# Directory names a defense may not take, since they sit beside the defense folders.
RESERVED = ("poison", "models", "scores", "bona_fide")
# Folders of a grid's results root that are not datasets.
RESERVED_DATASETS = ("logs", "figures")
# The bona fide set the config's top-level `bona_fide` describes; detectors name another with
# their `bona_fide` key, and a defense's plan and training read its detector's set.
DEFAULT_BONA_FIDE = "default"
# The model of the `none` defense: the final training on the whole poisoned set. Detectors that
# inspect "the attacked model" name it, so it is trained once per cell.
ATTACKED = "attacked"


def glob(kind: str, results: str = "results") -> str:
    """A glob matching every file of this kind under `results`."""
    import re

    return re.sub(r"\{[a-z]+\}", "*", PATTERNS[kind].replace("{results}", results))


def parse(kind: str, file, results: str | None = None) -> dict | None:
    """The wildcards of a file of this kind, read back from its path; None if it does not fit."""
    import re

    pat = re.escape(PATTERNS[kind])
    pat = pat.replace(re.escape("{results}"), "(?P<results>.+)" if results is None else re.escape(results))
    for w in WILDCARDS:
        pat = pat.replace(re.escape("{" + w + "}"), f"(?P<{w}>[^/]+)")
    m = re.fullmatch(pat, str(file))
    if not m:
        return None
    out = m.groupdict()
    if "seed" in out:
        if not out["seed"].isdigit():
            return None
        out["seed"] = int(out["seed"])
    return out


def path(kind: str, results: str = "results", **wildcards) -> str:
    return PATTERNS[kind].format(results=results, **wildcards)


def pattern(kind: str, results: str = "results") -> str:
    """The Snakemake pattern: every wildcard but the results root left in braces."""
    return PATTERNS[kind].replace("{results}", results)


def logs_dir(results: str) -> str:
    """A grid's log root: inside its results folder, so two grids never share (or overwrite) logs."""
    return f"{results}/logs"


def log_pattern(stage: str, logs: str = "logs") -> str:
    """The rule's `log:` pattern: every wildcard but the logs root and the stage left in braces."""
    return LOGS[stage].replace("{logs}", logs).replace("{stage}", stage)


def log(stage: str, logs: str = "logs", **cell) -> str:
    """The log file of one job."""
    return log_pattern(stage, logs).format(**cell)


# An input: (artifact kind, wildcards it sets beyond the job's own).
Input = tuple[str, dict]


@dataclass(frozen=True)
class Stage:
    cell: tuple[str, ...]  # the wildcards that name one job of the stage
    outputs: dict[str, str]  # I/O name -> artifact kind
    inputs: Callable[[dict], dict[str, Input]]  # spec -> I/O name -> input


# A stage's learned-trigger inputs are named TRIGGER + attack (the CLI's --trigger ATTACK=PATH).
TRIGGER = "trigger_"


def _triggers(attacks) -> dict[str, Input]:
    from .attacks import ATTACKS

    return {TRIGGER + a: ("trigger", {"attack": a}) for a in attacks if ATTACKS.get(a).learns()}


def trigger_inputs(inp: dict) -> dict[str, str]:
    """attack -> path of the learned-trigger inputs among a job's inputs."""
    return {k[len(TRIGGER):]: v for k, v in inp.items() if k.startswith(TRIGGER)}


def _bona_fide(spec: dict) -> Input:
    """The bona fide set a score, plan or train job reads: the one its spec names."""
    return ("bona_fide", {"bona": spec.get("bona_fide") or DEFAULT_BONA_FIDE})


def _poisoned(spec: dict) -> dict[str, Input]:
    return {"manifest": ("manifest", {}), "images": ("poisoned", {})}


def _score_inputs(spec: dict) -> dict[str, Input]:
    from .detectors import DETECTORS

    needs = DETECTORS.get(spec["type"], "detector type").needs
    out: dict[str, Input] = {"manifest": ("manifest", {}), "bona_fide": _bona_fide(spec)}
    for name in needs:
        if name == "images":
            out[name] = ("poisoned", {})
        else:
            out[name] = ({"trajectories": "losses", "weights": "defender_model"}.get(name, name), {"model": spec["model"]})
    return out


def _plan_inputs(spec: dict) -> dict[str, Input]:
    out: dict[str, Input] = {"manifest": ("manifest", {}), "bona_fide": _bona_fide(spec)}
    if spec.get("detector"):
        out["scores"] = ("scores", {"detector": spec["detector"]})
    return out


def _evaluate_inputs(spec: dict) -> dict[str, Input]:
    d = spec["defense"]
    out: dict[str, Input] = {"manifest": ("manifest", {}), "plan": ("plan", {"defense": d["name"]})}
    out["weights"] = ("defender_model", {"model": ATTACKED}) if trains_nothing(d) else ("final_model", {"defense": d["name"]})
    if d.get("detector"):
        out["scores"] = ("scores", {"detector": d["detector"]})
    out.update(_triggers(spec["attacks"]))
    return out


def _train_inputs(spec: dict) -> dict[str, Input]:
    from .remedies import REMEDIES

    out = {**_poisoned(spec), "bona_fide": _bona_fide(spec), "plan": ("plan", {})}
    d = spec.get("defense") or {}
    model = REMEDIES.get(d["remedy"], "remedy").reads_model(d) if d else None
    if model:
        out["weights"] = ("defender_model", {"model": model})
    return out


def trains_nothing(defense: dict) -> bool:
    """A defense whose plan keeps every example as is and whose final model is the dataset's own
    architecture: its model is the attacked model. (With another `arch` it trains its own.)"""
    return defense["remedy"] == "none" and not defense.get("arch")


CELL_W = ("dataset", "scenario", "seed")
STAGES: dict[str, Stage] = {
    "trigger": Stage(("dataset", "attack", "seed"), {"out": "trigger"}, lambda spec: {}),
    "poison": Stage(CELL_W, {"manifest": "manifest", "images": "poisoned"}, lambda spec: _triggers(spec["attacks"])),
    "bonafide": Stage(CELL_W + ("bona",), {"out": "bona_fide"}, lambda spec: {"manifest": ("manifest", {})}),
    "pretrain": Stage(CELL_W + ("model",), {"weights": "defender_model", "trajectories": "losses"}, _poisoned),
    "features": Stage(CELL_W + ("model",), {"out": "features"},
                      lambda spec: {**_poisoned(spec), "weights": ("defender_model", {})}),
    "score": Stage(CELL_W + ("detector",), {"out": "scores"}, _score_inputs),
    "plan": Stage(CELL_W + ("defense",), {"out": "plan"}, _plan_inputs),
    "train": Stage(CELL_W + ("defense",), {"out": "final_model"}, _train_inputs),
    "evaluate": Stage(CELL_W + ("defense",), {"out": "metrics"}, _evaluate_inputs),
}


def outputs(stage: str, results: str = "results", **cell) -> dict[str, str]:
    """Output paths of one job; wildcards not given stay as {wildcard} (Snakemake patterns)."""
    w = {k: cell.get(k, f"{{{k}}}") for k in STAGES[stage].cell}
    return {name: path(kind, results, **_fill(kind, w)) for name, kind in STAGES[stage].outputs.items()}


def inputs(stage: str, spec: dict, results: str = "results", **cell) -> dict[str, str]:
    w = {k: cell[k] for k in STAGES[stage].cell if k in cell}
    out = {}
    for name, (kind, extra) in STAGES[stage].inputs(spec).items():
        out[name] = path(kind, results, **_fill(kind, {**w, **extra}))
    return out


def _fill(kind: str, w: dict) -> dict:
    """The wildcards a pattern uses, from w; a missing one is a usage error naming it."""
    import string

    need = [f for _, f, _, _ in string.Formatter().parse(PATTERNS[kind]) if f and f != "results"]
    missing = [f for f in need if w.get(f) is None]
    if missing:
        from .errors import PoisongridError

        raise PoisongridError(f"the path of the {kind} file needs {', '.join('--' + m for m in missing)}")
    return {f: w[f] for f in need}
