rule score:
    """Anomaly score of every training example by one configured detector."""
    message:
        "{wildcards.dataset}/{wildcards.scenario}/seed{wildcards.seed}: scores of detector {wildcards.detector}"
    input:
        unpack(inputs("score")),
    output:
        **outputs("score"),
    params:
        spec=spec("score"),
        io=io_flags,
    # Short and deterministic: a failure here (e.g. missing data) is real, so it is not retried
    # (the profile's retries are for training jobs killed by the cluster).
    retries: 0
    group:
        gpu_group("score")
    resources:
        **resources_of("score"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        pgp.log_pattern("score", LOGS),
    shell:
        stage_shell("score")
