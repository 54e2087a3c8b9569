rule features:
    """Penultimate-layer features of every training example under one defender model."""
    message:
        "{wildcards.dataset}/{wildcards.scenario}/seed{wildcards.seed}: features of defender model {wildcards.model}"
    input:
        unpack(inputs("features")),
    output:
        **outputs("features"),
    params:
        spec=spec("features"),
        io=io_flags,
    group:
        gpu_group("features")
    resources:
        **resources_of("features"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        pgp.log_pattern("features", LOGS),
    threads: config["threads"]
    shell:
        stage_shell("features")
