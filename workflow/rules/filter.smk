rule filter:
    """Choose the examples a defense removes (none for defense 'none')."""
    input:
        unpack(filter_inputs),
    output:
        P("filter"),
    params:
        spec=spec("filter"),
        scores=lambda w, input: f"--scores {input.scores}" if "scores" in input.keys() else "",
    # Short and deterministic: a failure here (e.g. missing data) is real, so it is not retried
    # (the profile's retries are for training jobs killed by the cluster).
    retries: 0
    resources:
        **resources_of("filter"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        "logs/filter/{dataset}/{scenario}/seed{seed}/{defense}.log",
    shell:
        "poisongrid filter --spec {params.spec} --manifest {input.manifest} {params.scores} --out {output} 2> {log}"
