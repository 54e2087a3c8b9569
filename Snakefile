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


try:
    update_config(config, pgc.typed_overrides(workflow.config_settings.config))
    # Snakemake's own YAML reading keeps the last of a repeated key silently; ours refuses it.
    for _f in workflow.overwrite_configfiles or [os.path.join(workflow.basedir, "config.yaml")]:
        pgc.read_yaml(_f)
    pgc.validate(config)
except PoisongridError as e:
    sys.exit(f"poisongrid: invalid configuration: {e}")
# A dry run is known at parse time only from the output settings (its executor is chosen later).
_DRYRUN = bool(workflow.dryrun or getattr(getattr(workflow, "output_settings", None), "dryrun", False))
# A run (not a dry run, not a job a cluster node runs) needs the data where the loaders read it.
if workflow.is_main_process and not _DRYRUN:
    try:
        pgc.check_data(config)
    except PoisongridError as e:
        sys.exit(f"poisongrid: {e}")
if workflow.is_main_process:
    for _w in pgc.warnings(config):
        print(f"poisongrid: warning: {_w}", file=sys.stderr)

# Each config writes under its own results folder (its `results` key, else results/<file name>),
# so two grids never share aggregate files.
RESULTS = pgc.results_dir(config, workflow.overwrite_configfiles)
LOGS = pgp.logs_dir(RESULTS)
# A run that will write (not a dry run, a report, an unlock or another inspection) claims its results
# folder; a second one on the same folder is told that the first still runs.
_INSPECTING = ("--report", "--unlock", "--summary", "--detailed-summary", "--dag", "--rulegraph", "--filegraph",
               "--list-rules", "--lint", "--cleanup-metadata", "--touch", "--list-changes", "--containerize")
_CLAIMED = False
if workflow.is_main_process and not _DRYRUN and not any(a.split("=")[0] in _INSPECTING for a in sys.argv):
    from poisongrid import liveness as _pgl

    _msg = _pgl.claim_run(RESULTS)
    if _msg:
        sys.exit(f"poisongrid: {_msg}")
    _CLAIMED = True
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


onstart:
    _where = os.path.abspath(RESULTS)
    _outside = os.path.relpath(_where, os.getcwd()).startswith("..")
    print(f"poisongrid: this grid writes its results under {_where}"
          + (" (outside the folder this run started in)" if _outside else ""))
    _over = sorted(k for k in workflow.config_settings.config if k.split(".")[0] != "results")
    if _over and "results" not in {k.split(".")[0] for k in workflow.config_settings.config}:
        print(f"poisongrid: the overrides ({', '.join(_over)}) write into the same folder as the config file alone; "
              "where they change results, add results=<folder> to keep the two grids apart")


onerror:
    if _CLAIMED:
        _pgl.release_run(RESULTS)


onsuccess:
    import os

    if _CLAIMED:
        _pgl.release_run(RESULTS)

    # The answer last on the screen: each dataset's headline table, then where everything else is.
    if os.path.exists(f"{RESULTS}/tables.md"):
        from poisongrid.aggregate import headline_text

        print(headline_text(open(f"{RESULTS}/tables.md").read()))
        _cf = " ".join(f"--configfile {f}" for f in workflow.overwrite_configfiles)
        print(f"All tables: {RESULTS}/tables.md (and tables.html); figures: {RESULTS}/figures/\n"
              f"The report: snakemake --report {RESULTS}/report.html {_cf}".rstrip())
