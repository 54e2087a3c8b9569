rule plan:
    """Per-example weights of a defense: 1 train as usual, 0 drop, < 0 gradient ascent."""
    message:
        "{wildcards.dataset}/{wildcards.scenario}/seed{wildcards.seed} {wildcards.defense}: plan"
    input:
        unpack(inputs("plan")),
    output:
        **outputs("plan"),
    params:
        spec=spec("plan"),
        io=io_flags,
    # Short and deterministic: a failure here (e.g. missing data) is real, so it is not retried
    # (the profile's retries are for training jobs killed by the cluster).
    retries: 0
    resources:
        **resources_of("plan"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        pgp.log_pattern("plan", LOGS),
    shell:
        stage_shell("plan")
