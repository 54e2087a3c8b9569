rule train:
    """Train the final model from scratch on the plan's weighted examples."""
    input:
        unpack(inputs("train")),
    output:
        **outputs("train"),
    params:
        spec=spec("train"),
        io=io_flags,
    resources:
        **resources_of("train"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        "logs/train/{dataset}/{scenario}/seed{seed}/{defense}.log",
    threads: config["threads"]
    shell:
        stage_shell("train")
