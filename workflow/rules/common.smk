# Helpers shared by the rules (functions only; the rules live in the other .smk files). Every
# rule's inputs and outputs come from poisongrid.paths.STAGES, the declaration the CLI uses too.

CELL_WILDCARDS = ("dataset", "scenario", "seed", "attack", "model", "detector", "defense", "bona")


def _cell(w):
    return {k: getattr(w, k) for k in CELL_WILDCARDS if hasattr(w, k)}


def stage_spec(stage, w):
    c = _cell(w)
    seed = int(c.pop("seed")) if "seed" in c else None
    return pgc.stage_spec(config, stage, c.pop("dataset"), seed=seed, **c)


def outputs(stage):
    """The stage's output patterns (wildcards left in braces)."""
    return pgp.outputs(stage, RESULTS)


def inputs(stage):
    """Input function: the files the stage's spec declares for this job."""

    def f(w):
        return pgp.inputs(stage, stage_spec(stage, w), RESULTS, **_cell(w))

    return f


def spec(stage):
    """Rule params: the resolved part of the config this stage depends on, shell-quoted JSON."""

    def f(w):
        return shlex.quote(json.dumps(stage_spec(stage, w), sort_keys=True))

    return f


def io_flags(w, input, output):
    """The CLI's file flags for the job's declared inputs and outputs."""
    files = dict(list(input.items()) + list(output.items()))
    triggers = pgp.trigger_inputs(files)
    flags = [f"--trigger {a}={shlex.quote(p)}" for a, p in triggers.items()]
    flags += [f"--{name} {shlex.quote(p)}" for name, p in files.items() if not name.startswith(pgp.TRIGGER)]
    return " ".join(flags)


def stage_shell(stage):
    # pretrain/train with cluster.gpus_per_job > 1: torchrun, one data-parallel process per GPU.
    return f"{pgc.launcher(config, stage)} {stage} --spec {{params.spec}} {{params.io}} 2> {{log}}"


def gpu_group(stage):
    """The rule's group when cluster.jobs_per_gpu jobs share a GPU (one group job, one sbatch job,
    per jobs_per_gpu jobs of the stage); None (no group, the rule unchanged) otherwise."""
    group = pgc.share_group(config, stage)
    if group is None:
        return None

    def f(wildcards):
        # How many jobs a group spans is Snakemake's --group-components, which it installs from the
        # command line after reading the Snakefile; a group function runs while the DAG is built,
        # before groups are formed, so the config's sizes are added here (the command line's win).
        gs = workflow.group_settings
        want = pgc.group_components(config)
        if not all(g in gs.group_components for g in want):
            gs.group_components = {**want, **gs.group_components}
        return group

    return f


def resources_of(stage):
    """Scheduler resources of a rule, from the config's `cluster` keys; runtime per dataset (and
    per defender model for pretrain and features, per defense for train: architectures differ)."""
    some = next(iter(config["datasets"]))
    keys = pgc.resources(config, stage, some)

    def one(k):
        def f(w):
            model = getattr(w, "model", None) if stage in ("pretrain", "features") else None
            defense = getattr(w, "defense", None) if stage == "train" else None
            return pgc.resources(config, stage, w.dataset if hasattr(w, "dataset") else some, model, defense)[k]

        return f

    return {k: one(k) for k in keys}


def all_metrics():
    return [pgp.path("metrics", RESULTS, **c) for c in pgc.cells(config)]


def _cell_model_paths(detector_types):
    out = set()
    for c in pgc.cells(config):
        d = config["defenses"][c["defense"]]
        if d.get("detector") and config["detectors"][d["detector"]]["type"] in detector_types:
            m = config["detectors"][d["detector"]]["model"]
            out.add(pgp.path("losses", RESULTS, dataset=c["dataset"], scenario=c["scenario"], seed=c["seed"], model=m))
    return sorted(out)


def all_trajectories():
    """Per-epoch loss files some trajectory detector reads: each gets a trajectory figure."""
    return _cell_model_paths(pgc.trajectory_detector_types(config))


def all_teacher_losses():
    """Loss files of LfD teachers: each gets a loss-distribution figure."""
    return _cell_model_paths({"teacher_loss"})


# Outputs flagged with report() make up `snakemake --report results/report.html` (captions: workflow/report/).
REPORT_CAPTIONS = "../report/"
# One report section per analysis. The report lists sections in alphabetical order, so the number
# sets their order: the tables first, the downloads last. (The front page, workflow/report/workflow.rst,
# shows the multi- and single-attack tables too.)
REPORT_CATEGORY = {"headline": "0 The answer", "papers": "0 The papers' numbers beside ours", "multi": "1 Multi-attack (Table 2)", "single": "2 Single-attack (Table 1)",
                   "singlemulti": "3 Single vs multi-attack", "rreject": "4 r_reject", "rejection": "4 r_reject", "capacity": "5 LfD teacher capacity",
                   "trajectories": "6 Trajectories", "teacher": "7 LfD teacher losses", "cost": "8 Cost",
                   "all": "9 All tables and downloads"}
# The tables of each analysis, one HTML page each (poisongrid.aggregate.TABLE_SECTIONS).
REPORT_TABLES = {"headline": "every defense in one table, the best marked", "papers": "the papers' numbers beside ours", "multi": "multi-attack tables", "single": "single-attack tables", "singlemulti": "single vs multi table",
                 "cost": "cost table", "rejection": "rejection by class size (Appendix G)"}


def report_tables():
    """The per-analysis table pages `poisongrid aggregate` writes, each first in its report section
    (the papers' numbers only where the config names a set of them)."""
    return [report(f"{RESULTS}/tables_{kind}.html", caption=f"{REPORT_CAPTIONS}tables_{kind}.rst",
                   category=REPORT_CATEGORY[kind], subcategory="0 Tables (all datasets)", labels={"table": f"tables_{kind}.html: {what}"})
            for kind, what in REPORT_TABLES.items() if kind != "papers" or config.get("paper_numbers")]


def report_figures():
    """The figures `poisongrid aggregate` draws, each flagged for the report with the caption of its kind.

    Listed from the config rather than declared as one directory(), because a report() flag carries one
    caption and each kind needs its own; poisongrid.config.figure_names decides them for aggregate too.
    ASR bar charts go to the multi- or single-attack section by their scenario."""
    out = []
    for kind, name, label, subcat in pgc.figure_names(config, all_trajectories(), all_teacher_losses()):
        section = kind
        if kind == "asr":
            section = "multi" if label.rsplit(" — ", 1)[-1] == "multi" else "single"
        out.append(report(f"{RESULTS}/figures/{name}", caption=f"{REPORT_CAPTIONS}{kind}.rst",
                          category=REPORT_CATEGORY[section], subcategory=subcat, labels={"figure": label}))
    return out
