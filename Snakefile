# poisongrid: datasets x scenarios x defenses x seeds.
#   snakemake --cores 2 --configfile configs/demo.yaml all
#   snakemake --cores 2 results/digits/multi/seed0/badloss/metrics.json   (one cell)
import json
import shlex
import sys

from snakemake.utils import min_version, validate

from poisongrid import config as pgc
from poisongrid import paths as pgp
from poisongrid.attacks import ATTACKS
from poisongrid.detectors import DETECTORS
from poisongrid.errors import PoisongridError

min_version("8.0")

# --configfile replaces the paper grid rather than being merged into it.
if not config:

    configfile: "config.yaml"


validate(config, "workflow/schemas/config.schema.json")
try:
    pgc.validate(config)
except PoisongridError as e:
    sys.exit(f"poisongrid: invalid configuration: {e}")

RESULTS = "results"


wildcard_constraints:
    dataset=r"[A-Za-z0-9_\-]+",
    scenario=r"multi|single-[a-z_]+",
    seed=r"\d+",
    attack=r"[a-z_]+",
    detector=r"[A-Za-z0-9_]+",
    defense=r"(?!(?:poison|pretrain|scores)/)[A-Za-z0-9_]+",


def P(kind, **w):
    """A path of the artifact layout; wildcards not given stay as {wildcards}."""
    return pgp.pattern(kind, RESULTS).format(**{k: "{" + k + "}" for k in ("dataset", "scenario", "seed", "attack", "detector", "defense")} | w)


def spec(stage, **extra):
    """Rule params: the resolved part of the config this stage depends on, shell-quoted JSON."""

    def f(w):
        args = {k: getattr(w, k, None) for k in ("scenario", "defense", "detector")}
        seed = int(w.seed) if hasattr(w, "seed") else None
        return shlex.quote(json.dumps(pgc.stage_spec(config, stage, w.dataset, seed=seed, **args, **extra), sort_keys=True))

    return f


def scenario_triggers(w):
    """Learned-trigger artifacts the scenario's attacks need (e.g. Narcissus)."""
    names = pgc.scenario_attacks(config["datasets"][w.dataset], w.scenario)
    return {a: P("trigger", dataset=w.dataset, attack=a, seed=w.seed) for a in names if ATTACKS.get(a).needs_trigger_file}


def trigger_flags(w, input):
    return " ".join(f"--trigger {a}={input[a]}" for a in scenario_triggers(w))


def defense_of(w):
    return config["defenses"][w.defense]


def resources_of(stage):
    """Scheduler resources of a rule, from the config's `cluster` keys; runtime per dataset."""
    some = next(iter(config["datasets"]))
    keys = pgc.resources(config, stage, some)
    return {k: (lambda w, k=k: pgc.resources(config, stage, w.dataset if hasattr(w, "dataset") else some)[k]) for k in keys}


def gpu_threads(stage):
    return config["threads"]


def all_metrics():
    return [pgp.path("metrics", RESULTS, **c) for c in pgc.cells(config)]


def all_trajectories():
    if not any(d.get("detector") and DETECTORS.get(config["detectors"][d["detector"]]["type"]).inputs.count("trajectories")
               for d in config["defenses"].values()):
        return []
    return sorted({pgp.path("trajectories", RESULTS, dataset=c["dataset"], scenario=c["scenario"], seed=c["seed"])
                   for c in pgc.cells(config)})


report: "workflow/report/workflow.rst"


include: "workflow/rules/trigger.smk"
include: "workflow/rules/poison.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/filter.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    input:
        RESULTS + "/summary.csv",
        RESULTS + "/tables.md",
    default_target: True


onsuccess:
    import os

    if os.path.exists(RESULTS + "/tables.md"):
        print(open(RESULTS + "/tables.md").read())
