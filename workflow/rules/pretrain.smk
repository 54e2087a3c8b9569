rule pretrain:
    """Train one defender model on the cell's poisoned set (BaDLoss pretraining, LfD's teacher, the
    attacked model, ...), recording per-example losses; shared by every detector that names it."""
    message:
        "{wildcards.dataset}/{wildcards.scenario}/seed{wildcards.seed}: train defender model {wildcards.model}"
    input:
        unpack(inputs("pretrain")),
    output:
        **outputs("pretrain"),
    params:
        spec=spec("pretrain"),
        io=io_flags,
    group:
        gpu_group("pretrain")
    resources:
        **resources_of("pretrain"),
    conda:
        "../../envs/poisongrid.yaml"
    log:
        pgp.log_pattern("pretrain", LOGS),
    threads: config["threads"]
    shell:
        stage_shell("pretrain")

