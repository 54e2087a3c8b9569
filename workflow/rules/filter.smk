def filter_inputs(w):
    d = defense_of(w)
    out = {"manifest": P("manifest", dataset=w.dataset, scenario=w.scenario, seed=w.seed)}
    if d.get("detector"):
        out["scores"] = P("scores", dataset=w.dataset, scenario=w.scenario, seed=w.seed, detector=d["detector"])
    return out


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
    log:
        "logs/filter/{dataset}/{scenario}/seed{seed}/{defense}.log",
    shell:
        "poisongrid filter --spec {params.spec} --manifest {input.manifest} {params.scores} --out {output} 2> {log}"
