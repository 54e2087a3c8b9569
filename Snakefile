# poisongrid: datasets x scenarios x defenses x seeds.
#   snakemake all --cores 2 --configfile configs/demo.yaml
#   snakemake --cores 2 results/demo/digits/multi/seed0/badloss/metrics.json --configfile configs/demo.yaml   (one cell)
import json
import os
import shlex
import sys

from snakemake.utils import min_version, update_config

from poisongrid import config as pgc
from poisongrid import paths as pgp
from poisongrid.errors import PoisongridError

min_version("8.0")

# --configfile replaces the paper grid rather than being merged into it; --config KEY=YAML
# overrides merge into whichever file is used (nested values as YAML flow mappings, typed).
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config.yaml")


update_config(config, pgc.typed_overrides(workflow.config_settings.config))
try:
    # Snakemake's own YAML reading keeps the last of a repeated key silently; ours refuses it.
    for _f in workflow.overwrite_configfiles or [os.path.join(workflow.basedir, "config.yaml")]:
        pgc.read_yaml(_f)
    pgc.validate(config)
except PoisongridError as e:
    sys.exit(f"poisongrid: invalid configuration: {e}")

# Each config writes under its own results folder (its `results` key, else results/<file name>),
# so two grids never share aggregate files.
RESULTS = pgc.results_dir(config, workflow.overwrite_configfiles)
# envs/poisongrid.yaml installs the package from here when --sdm conda builds the environment.
os.environ.setdefault("POISONGRID_ROOT", workflow.basedir)


wildcard_constraints:
    dataset=r"[A-Za-z0-9_\-]+",
    scenario=r"multi|clean|single-[a-z0-9_]+",
    seed=r"\d+",
    attack=r"[a-z0-9_]+",
    model=r"[A-Za-z0-9_]+",
    detector=r"[A-Za-z0-9_]+",
    defense=r"(?!(?:poison|models|scores|bona_fide)/)[A-Za-z0-9_]+",
    bona=r"[A-Za-z0-9_]+",


include: "workflow/rules/common.smk"


report: "workflow/report/workflow.rst"


include: "workflow/rules/trigger.smk"
include: "workflow/rules/poison.smk"
include: "workflow/rules/bonafide.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/aggregate.smk"


rule all:
    """Every cell's metrics (a deleted one is made again) and the aggregate tables and figures."""
    input:
        all_metrics(),
        pgp.path("summary", RESULTS),
        f"{RESULTS}/tables.md",
    default_target: True


onsuccess:
    import os

    if os.path.exists(f"{RESULTS}/tables.md"):
        print(open(f"{RESULTS}/tables.md").read())
