rule poison:
    """Apply the scenario's attacks to the training set; write the manifest and the changed images."""
    message:
        "{wildcards.dataset}/{wildcards.scenario}/seed{wildcards.seed}: poison the training set"
    input:
        unpack(inputs("poison")),
    output:
        **outputs("poison"),
    params:
        spec=spec("poison"),
        io=io_flags,
    # Short and deterministic: a failure here (e.g. missing data) is real, so it is not retried
    # (the profile's retries are for training jobs killed by the cluster).
    retries: 0
    resources:
        **resources_of("poison"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        pgp.log_pattern("poison", LOGS),
    shell:
        stage_shell("poison")
