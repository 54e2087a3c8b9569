rule trigger:
    """Optimise a learned trigger (Narcissus) on a surrogate; cached per dataset and seed."""
    output:
        P("trigger"),
    params:
        spec=spec("trigger"),
    resources:
        **resources_of("trigger"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        "logs/trigger/{dataset}/{attack}-seed{seed}.log",
    threads: config["threads"]
    shell:
        "poisongrid trigger --spec {params.spec} --out {output} 2> {log}"
