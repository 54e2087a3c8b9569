rule aggregate:
    """Tidy summary of every cell, the paper-shaped tables and the figures."""
    input:
        metrics=all_metrics(),
        trajectories=all_trajectories(),
    output:
        csv=RESULTS + "/summary.csv",
        parquet=RESULTS + "/summary.parquet",
        tables=RESULTS + "/tables.md",
    resources:
        **resources_of("aggregate"),
    log:
        "logs/aggregate/aggregate.log",
    shell:
        "poisongrid aggregate --out " + RESULTS + " --metrics {input.metrics} --trajectories {input.trajectories} > {log} 2>&1"
