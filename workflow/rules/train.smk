rule train:
    """Train the final model from scratch on the plan's weighted examples."""
    message:
        "{wildcards.dataset}/{wildcards.scenario}/seed{wildcards.seed} {wildcards.defense}: final training"
    input:
        unpack(inputs("train")),
    output:
        **outputs("train"),
    params:
        spec=spec("train"),
        io=io_flags,
    group:
        gpu_group("train")
    resources:
        **resources_of("train"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        pgp.log_pattern("train", LOGS),
    threads: config["threads"]
    shell:
        stage_shell("train")
