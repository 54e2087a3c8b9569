rule aggregate:
    """Tidy summary of every cell, the paper-shaped tables and the figures."""
    message:
        "aggregate: summary, tables and figures of every cell"
    input:
        metrics=all_metrics(),
        trajectories=all_trajectories(),
        teacher=all_teacher_losses(),
    output:
        csv=report(pgp.path("summary", RESULTS), category="Tables",
                   labels={"table": "summary.csv: one row per cell and attack (download)"}),
        parquet=f"{RESULTS}/summary.parquet",
        tables=f"{RESULTS}/tables.md",
        tables_html=report(f"{RESULTS}/tables.html", caption=f"{REPORT_CAPTIONS}tables.rst", category="Tables",
                           labels={"table": "tables.html: the paper-shaped tables (tables.md)"}),
        figures=report_figures(),
    retries: 0
    resources:
        **resources_of("aggregate"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        pgp.log_pattern("aggregate"),
    shell:
        f"poisongrid aggregate --out {RESULTS} --metrics {{input.metrics}} --trajectories {{input.trajectories}} --teacher-losses {{input.teacher}} > {{log}} 2>&1"
