rule score:
    """Anomaly score of every training example by one configured detector."""
    input:
        unpack(score_inputs),
    output:
        P("scores"),
    params:
        spec=spec("score"),
        inputs=lambda w, input: " ".join(f"--{k} {v}" for k, v in input.items()),
    # Short and deterministic: a failure here (e.g. missing data) is real, so it is not retried
    # (the profile's retries are for training jobs killed by the cluster).
    retries: 0
    resources:
        **resources_of("score"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        "logs/score/{dataset}/{scenario}/seed{seed}/{detector}.log",
    shell:
        "poisongrid score --spec {params.spec} {params.inputs} --out {output} 2> {log}"
