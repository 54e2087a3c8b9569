rule trigger:
    """Optimise a learned trigger (Narcissus) on a surrogate; cached per dataset and seed."""
    message:
        "{wildcards.dataset} seed {wildcards.seed}: learn the {wildcards.attack} trigger"
    output:
        **outputs("trigger"),
    params:
        spec=spec("trigger"),
        io=io_flags,
    group:
        gpu_group("trigger")
    resources:
        **resources_of("trigger"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        pgp.log_pattern("trigger", LOGS),
    threads: config["threads"]
    shell:
        stage_shell("trigger")
