rule poison:
    """Apply the scenario's attacks to the training set; write the manifest and the changed images."""
    input:
        unpack(scenario_triggers),
    output:
        manifest=P("manifest"),
        images=P("poisoned"),
    params:
        spec=spec("poison"),
        triggers=lambda w, input: trigger_flags(w, input),
    # Short and deterministic: a failure here (e.g. missing data) is real, so it is not retried
    # (the profile's retries are for training jobs killed by the cluster).
    retries: 0
    resources:
        **resources_of("poison"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        "logs/poison/{dataset}/{scenario}/seed{seed}.log",
    shell:
        "poisongrid poison --spec {params.spec} --manifest {output.manifest} --images {output.images} {params.triggers} 2> {log}"
