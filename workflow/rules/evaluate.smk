rule evaluate:
    """Clean accuracy, ASR per attack (plain and boosted), detection quality -> metrics.json."""
    message:
        "{wildcards.dataset}/{wildcards.scenario}/seed{wildcards.seed} {wildcards.defense}: evaluate"
    input:
        unpack(inputs("evaluate")),
    output:
        **outputs("evaluate"),
    params:
        spec=spec("evaluate"),
        io=io_flags,
    # Short and deterministic: a failure here (e.g. missing data) is real, so it is not retried
    # (the profile's retries are for training jobs killed by the cluster).
    retries: 0
    resources:
        **resources_of("evaluate"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        pgp.log_pattern("evaluate", LOGS),
    threads: config["threads"]
    shell:
        stage_shell("evaluate")
