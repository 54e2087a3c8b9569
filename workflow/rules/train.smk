rule train:
    """Train the final model from scratch on the examples the defense kept."""
    input:
        manifest=P("manifest"),
        images=P("poisoned"),
        keep=P("filter"),
    output:
        P("model"),
    params:
        spec=spec("train"),
    resources:
        **resources_of("train"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        "logs/train/{dataset}/{scenario}/seed{seed}/{defense}.log",
    threads: config["threads"]
    shell:
        "poisongrid train --spec {params.spec} --manifest {input.manifest} --images {input.images} --keep {input.keep} --out {output} 2> {log}"
