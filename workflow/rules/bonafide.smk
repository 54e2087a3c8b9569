rule bonafide:
    """The examples the defender knows to be clean (one file per bona fide set), drawn apart from
    the poisoning: changing them reruns neither it nor pretraining."""
    message:
        "{wildcards.dataset}/{wildcards.scenario}/seed{wildcards.seed}: bona fide set {wildcards.bona}"
    input:
        unpack(inputs("bonafide")),
    output:
        **outputs("bonafide"),
    params:
        spec=spec("bonafide"),
        io=io_flags,
    # Short and deterministic: a failure here (e.g. missing data) is real, so it is not retried
    # (the profile's retries are for training jobs killed by the cluster).
    retries: 0
    resources:
        **resources_of("bonafide"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        pgp.log_pattern("bonafide", LOGS),
    shell:
        stage_shell("bonafide")
