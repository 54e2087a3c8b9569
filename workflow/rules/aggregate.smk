# Outputs flagged with report() make up `snakemake --report results/report.html` (captions: workflow/report/).
REPORT_CAPTIONS = "../report/"


def report_figures():
    """The figures `poisongrid aggregate` draws, each flagged for the report with the caption of its kind.

    Listed from the config rather than declared as one directory(), because a report() flag carries one
    caption and the three kinds need their own. The r_reject rule mirrors poisongrid.aggregate.rreject_figure:
    a figure where some detector has >= 2 r_reject values among a dataset/scenario's 'remove' defenses.
    """
    fig = RESULTS + "/figures/fig_{}.png"
    trajectories = set(all_trajectories())
    out, pairs = [], list(dict.fromkeys((c["dataset"], c["scenario"]) for c in pgc.cells(config)))
    for ds, sc in pairs:
        out.append(report(fig.format(f"asr_{ds}_{sc}"), caption=REPORT_CAPTIONS + "asr.rst", category="ASR",
                          subcategory=ds, labels={"figure": f"{ds} — {sc}"}))
        sweeps = {}
        for d in config["defenses"].values():
            if d["remedy"] == "remove" and d.get("r_reject") is not None and pgc.defense_applies(d, ds, sc):
                sweeps.setdefault(d["detector"], set()).add(float(d["r_reject"]))
        if any(len(r) >= 2 for r in sweeps.values()):
            out.append(report(fig.format(f"rreject_{ds}_{sc}"), caption=REPORT_CAPTIONS + "rreject.rst",
                              category="r_reject", subcategory=ds, labels={"figure": f"{ds} — {sc}"}))
    for ds, sc, seed in dict.fromkeys((c["dataset"], c["scenario"], c["seed"]) for c in pgc.cells(config)):
        if pgp.path("trajectories", RESULTS, dataset=ds, scenario=sc, seed=seed) in trajectories:
            out.append(report(fig.format(f"trajectories_{ds}_{sc}_seed{seed}"),
                              caption=REPORT_CAPTIONS + "trajectories.rst", category="Trajectories", subcategory=ds,
                              labels={"figure": f"{ds} — {sc}, seed {seed}"}))
    return out


rule aggregate:
    """Tidy summary of every cell, the paper-shaped tables and the figures."""
    input:
        metrics=all_metrics(),
        trajectories=all_trajectories(),
    output:
        csv=report(RESULTS + "/summary.csv", category="Tables",
                   labels={"table": "summary.csv: one row per cell and attack (download)"}),
        parquet=RESULTS + "/summary.parquet",
        tables=RESULTS + "/tables.md",
        tables_html=report(RESULTS + "/tables.html", caption=REPORT_CAPTIONS + "tables.rst", category="Tables",
                           labels={"table": "tables.html: the paper-shaped tables (tables.md)"}),
        figures=report_figures(),
    resources:
        **resources_of("aggregate"),
    log:
        "logs/aggregate/aggregate.log",
    shell:
        "poisongrid aggregate --out " + RESULTS + " --metrics {input.metrics} --trajectories {input.trajectories} > {log} 2>&1"
