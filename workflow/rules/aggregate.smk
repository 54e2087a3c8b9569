rule aggregate:
    """Tidy summary of every cell (per seed and mean ± std over seeds), the paper-shaped tables and the figures."""
    message:
        "aggregate: summary, tables and figures of every cell"
    input:
        metrics=all_metrics(),
        trajectories=all_trajectories(),
        teacher=all_teacher_losses(),
    output:
        csv=report(pgp.path("summary", RESULTS), category=REPORT_CATEGORY["all"],
                   labels={"table": "summary.csv: one row per cell (seed) and attack (download)"}),
        parquet=f"{RESULTS}/summary.parquet",
        stats=report(f"{RESULTS}/summary_stats.csv", category=REPORT_CATEGORY["all"],
                     labels={"table": "summary_stats.csv: mean, sample std and n over seeds (download)"}),
        tables=f"{RESULTS}/tables.md",
        per_seed=report(f"{RESULTS}/tables_per_seed.md", category=REPORT_CATEGORY["all"],
                        labels={"table": "tables_per_seed.md: every seed's own numbers (download)"}),
        tables_html=report(f"{RESULTS}/tables.html", caption=f"{REPORT_CAPTIONS}tables.rst", category=REPORT_CATEGORY["all"],
                           labels={"table": "tables.html: every table (tables.md)"}),
        sections=report_tables(),
        figures=report_figures(),
    retries: 0
    resources:
        **resources_of("aggregate"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        pgp.log_pattern("aggregate", LOGS),
    params:
        papers=f"--paper-numbers {config['paper_numbers']}" if config.get("paper_numbers") else "",
    shell:
        f"poisongrid aggregate --out {RESULTS} --metrics {{input.metrics}} --trajectories {{input.trajectories}} --teacher-losses {{input.teacher}} {{params.papers}} > {{log}} 2>&1"
