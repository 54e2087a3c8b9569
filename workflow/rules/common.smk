# Helpers shared by the rules (functions only; the rules live in the other .smk files).


def P(kind, **w):
    """A path of the artifact layout; wildcards not given stay as {wildcards}."""
    return pgp.pattern(kind, RESULTS).format(**{k: f"{{{k}}}" for k in ("dataset", "scenario", "seed", "attack", "detector", "defense")} | w)


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


def all_metrics():
    return [pgp.path("metrics", RESULTS, **c) for c in pgc.cells(config)]


def all_trajectories():
    if not any(d.get("detector") and DETECTORS.get(config["detectors"][d["detector"]]["type"]).inputs.count("trajectories")
               for d in config["defenses"].values()):
        return []
    return sorted({pgp.path("trajectories", RESULTS, dataset=c["dataset"], scenario=c["scenario"], seed=c["seed"])
                   for c in pgc.cells(config)})


def score_inputs(w):
    det = config["detectors"][w.detector]
    return {kind: P(kind, dataset=w.dataset, scenario=w.scenario, seed=w.seed) for kind in DETECTORS.get(det["type"]).inputs}


def filter_inputs(w):
    d = defense_of(w)
    out = {"manifest": P("manifest", dataset=w.dataset, scenario=w.scenario, seed=w.seed)}
    if d.get("detector"):
        out["scores"] = P("scores", dataset=w.dataset, scenario=w.scenario, seed=w.seed, detector=d["detector"])
    return out


def evaluate_inputs(w):
    out = {
        "manifest": P("manifest", dataset=w.dataset, scenario=w.scenario, seed=w.seed),
        "keep": P("filter", dataset=w.dataset, scenario=w.scenario, seed=w.seed, defense=w.defense),
        "model": P("model", dataset=w.dataset, scenario=w.scenario, seed=w.seed, defense=w.defense),
        **scenario_triggers(w),
    }
    det = defense_of(w).get("detector")
    if det:
        kinds = DETECTORS.get(config["detectors"][det]["type"]).inputs
        out["scores"] = P("scores", dataset=w.dataset, scenario=w.scenario, seed=w.seed, detector=det)
        if "trajectories" in kinds:
            out["trajectories"] = P("trajectories", dataset=w.dataset, scenario=w.scenario, seed=w.seed)
    return out


def evaluate_flags(w, input):
    flags = [trigger_flags(w, input)]
    for k in ("scores", "trajectories"):
        if k in input.keys():
            flags.append(f"--{k} {input[k]}")
    return " ".join(flags)


# Outputs flagged with report() make up `snakemake --report results/report.html` (captions: workflow/report/).
REPORT_CAPTIONS = "../report/"


def report_figures():
    """The figures `poisongrid aggregate` draws, each flagged for the report with the caption of its kind.

    Listed from the config rather than declared as one directory(), because a report() flag carries one
    caption and the three kinds need their own. Which r_reject figures exist is decided by the same
    swept_detectors() that poisongrid.aggregate.rreject_figure uses.
    """
    fig = f"{RESULTS}/figures/fig_{{}}.png"
    trajectories = set(all_trajectories())
    out, pairs = [], list(dict.fromkeys((c["dataset"], c["scenario"]) for c in pgc.cells(config)))
    for ds, sc in pairs:
        out.append(report(fig.format(f"asr_{ds}_{sc}"), caption=f"{REPORT_CAPTIONS}asr.rst", category="ASR",
                          subcategory=ds, labels={"figure": f"{ds} — {sc}"}))
        here = [d for d in config["defenses"].values() if pgc.defense_applies(d, ds, sc)]
        if pgc.swept_detectors((d.get("detector"), d["remedy"], d.get("r_reject")) for d in here):
            out.append(report(fig.format(f"rreject_{ds}_{sc}"), caption=f"{REPORT_CAPTIONS}rreject.rst",
                              category="r_reject", subcategory=ds, labels={"figure": f"{ds} — {sc}"}))
    for ds, sc, seed in dict.fromkeys((c["dataset"], c["scenario"], c["seed"]) for c in pgc.cells(config)):
        if pgp.path("trajectories", RESULTS, dataset=ds, scenario=sc, seed=seed) in trajectories:
            out.append(report(fig.format(f"trajectories_{ds}_{sc}_seed{seed}"),
                              caption=f"{REPORT_CAPTIONS}trajectories.rst", category="Trajectories", subcategory=ds,
                              labels={"figure": f"{ds} — {sc}, seed {seed}"}))
    return out
