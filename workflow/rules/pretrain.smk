rule pretrain:
    """Short training run recording every example's loss after each epoch (BaDLoss trajectories)."""
    input:
        manifest=P("manifest"),
        images=P("poisoned"),
    output:
        P("trajectories"),
    params:
        spec=spec("pretrain"),
    resources:
        **resources_of("pretrain"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        "logs/pretrain/{dataset}/{scenario}/seed{seed}.log",
    threads: config["threads"]
    shell:
        "poisongrid pretrain --spec {params.spec} --manifest {input.manifest} --images {input.images} --out {output} 2> {log}"
