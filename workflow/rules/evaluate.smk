def evaluate_inputs(w):
    out = {
        "manifest": P("manifest", dataset=w.dataset, scenario=w.scenario, seed=w.seed),
        "keep": P("filter", dataset=w.dataset, scenario=w.scenario, seed=w.seed, defense=w.defense),
        "model": P("model", dataset=w.dataset, scenario=w.scenario, seed=w.seed, defense=w.defense),
        **scenario_triggers(w),
    }
    det = defense_of(w).get("detector")
    if det:
        kinds = DETECTORS.get(config["detectors"][det]["type"]).inputs
        out["scores"] = P("scores", dataset=w.dataset, scenario=w.scenario, seed=w.seed, detector=det)
        if "trajectories" in kinds:
            out["trajectories"] = P("trajectories", dataset=w.dataset, scenario=w.scenario, seed=w.seed)
    return out


def evaluate_flags(w, input):
    flags = [trigger_flags(w, input)]
    for k in ("scores", "trajectories"):
        if k in input.keys():
            flags.append(f"--{k} {input[k]}")
    return " ".join(flags)


rule evaluate:
    """Clean accuracy, ASR per attack (plain and boosted), detection quality -> metrics.json."""
    input:
        unpack(evaluate_inputs),
    output:
        P("metrics"),
    params:
        spec=spec("evaluate"),
        flags=evaluate_flags,
    # Short and deterministic: a failure here (e.g. missing data) is real, so it is not retried
    # (the profile's retries are for training jobs killed by the cluster).
    retries: 0
    resources:
        **resources_of("evaluate"),
    log:
        "logs/evaluate/{dataset}/{scenario}/seed{seed}/{defense}.log",
    threads: config["threads"]
    shell:
        "poisongrid evaluate --spec {params.spec} --manifest {input.manifest} --keep {input.keep} "
        "--model {input.model} {params.flags} --out {output} 2> {log}"
