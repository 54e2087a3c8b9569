"""What a job asks the scheduler for: GPU minutes estimated from each dataset's measured rates,
memory, partition, GPUs, shared-GPU groups and the command that launches it."""
from __future__ import annotations

from ..paths import trains_nothing
from .specs import (
    KNOWN_NUM_CLASSES,
    KNOWN_TEST_SIZES,
    KNOWN_TRAIN_SIZES,
    dataset_entry,
    defender_model_spec,
    final_training_spec,
    n_clean_of,
    train_size,
)


GPU_STAGES = ("trigger", "pretrain", "features", "train")

# Stages whose training runs data-parallel over cluster.gpus_per_job GPUs; the other GPU stages use one.
DATA_PARALLEL_STAGES = ("pretrain", "train")


def dataset_scale(cfg: dict, dataset: str) -> dict:
    """What cost estimates need of a dataset: classes, training-set size (from its files when
    present, else the known size of a standard dataset), bona fide count, epochs."""
    ds = dataset_entry(cfg, dataset)
    n = None
    try:
        n = train_size(ds, cfg["data_dir"])
    except Exception:  # noqa: BLE001 - an estimate falls back to the standard size
        n = None
    loader = ds["loader"]
    n_train = n or KNOWN_TRAIN_SIZES.get(loader, KNOWN_TRAIN_SIZES.get(dataset))
    # The test set's size where known, else a fifth of the training set's.
    n_test = KNOWN_TEST_SIZES.get(loader, KNOWN_TEST_SIZES.get(dataset)) or int(0.2 * (n_train or 50000))
    return {"num_classes": KNOWN_NUM_CLASSES.get(loader, KNOWN_NUM_CLASSES.get(dataset, 10)), "n_train": n_train,
            "n_clean": cfg["bona_fide"]["n_clean"], "epochs": ds["epochs"],
            "n_validation": int(round(cfg["validation"]["fraction"] * n_test))}


def detector_scale(cfg: dict, dataset: str, detector: str) -> dict:
    """dataset_scale with the bona fide count of the set the detector reads."""
    return {**dataset_scale(cfg, dataset), "n_clean": n_clean_of(cfg, detector=detector)}


def epoch_minutes(cfg: dict, dataset: str) -> tuple[float, float, str]:
    """(minutes per epoch, eager minutes per epoch, where they come from) of a dataset's model on
    one GPU: the config's measured values, else derived from its training-set size, image size and
    model at the rates measured for costs.py (an estimate that errs long)."""
    from ..costs import derived_minutes_per_epoch

    ds = dataset_entry(cfg, dataset)
    mpe, eager = ds.get("minutes_per_epoch"), ds.get("eager_minutes_per_epoch")
    if mpe is not None:
        return mpe, eager or mpe, "measured (minutes_per_epoch)"
    n = dataset_scale(cfg, dataset)["n_train"]
    if not n:
        return 1.0, eager or 1.0, "unknown training-set size: 1 minute per epoch assumed (set minutes_per_epoch)"
    size = ds.get("image_size")
    derived = derived_minutes_per_epoch(n, ds["model"], size)
    return derived, eager or derived_minutes_per_epoch(n, ds["model"], size, eager=True), \
        f"derived from {n:,} images at {f'{size} px' if size else 'the native size'} with {ds['model']} (costs.py)"


def estimated_minutes(cfg: dict, stage: str, dataset: str, model: str | None = None, detector: str | None = None,
                      defense: str | None = None, attack: str | None = None) -> float:
    """GPU minutes one job of a stage needs, from the dataset's measured minutes per epoch; the
    most expensive defender model, detector or defense when none is named (a rule-wide limit)."""
    from ..costs import cost_factor

    ds = dataset_entry(cfg, dataset)
    # Work outside the graph-replayed training step (detectors' own optimisation, a remedy's
    # per-batch objective, learned triggers) launches every kernel from Python: its own rate.
    mpe, eager, _ = epoch_minutes(cfg, dataset)

    def arch_mpe(arch: str, rate: float = mpe) -> float:
        # minutes_per_epoch is measured with the dataset's model; another architecture scales it.
        return rate * cost_factor(arch, ds["model"], ds["image_size"])

    if stage == "pretrain":
        names = [model] if model else list(cfg["defender_models"])
        def one(name):
            m = defender_model_spec(cfg, dataset, name)
            extra = {"eval": 1.3, "final": 1.0 + 0.3 / m["run"], "train": 1.0}[m["record"]]  # eval passes
            return m["run"] * arch_mpe(m["training"]["model"]) * extra
        return max(one(n) for n in names)
    if stage == "train":
        from ..remedies import REMEDIES

        data = dataset_scale(cfg, dataset)
        names = [defense] if defense else [n for n, d in cfg["defenses"].items() if not trains_nothing(d)]
        def remedy(n):
            r = REMEDIES.get(cfg["defenses"][n]["remedy"])
            return (r.epochs(cfg["defenses"][n], {**data, "n_clean": n_clean_of(cfg, defense=n)})
                    * arch_mpe(final_training_spec(cfg, dataset, n)["model"], mpe if r.graphed else eager))
        return max([remedy(n) for n in names] + [0.0])
    if stage == "features":
        names = [model] if model else list(cfg["defender_models"])
        return max(0.5 * arch_mpe(defender_model_spec(cfg, dataset, n)["training"]["model"]) for n in names) + 2
    if stage == "trigger":
        from ..attacks import ATTACKS

        names = [attack] if attack else [a for a in ds["attacks"] if ATTACKS.get(a).learns()]
        def learned(a):
            cls, s = ATTACKS.get(a), ds["attacks"][a]["learn"]
            graphed = cls.learn_graphed_epochs(s)
            return graphed * mpe + (cls.learn_epochs(s) - graphed) * eager + 5
        return max([learned(a) for a in names] + [0.0])
    if stage == "score":
        from ..detectors import DETECTORS

        names = [detector] if detector else list(cfg["detectors"])
        return max([DETECTORS.get(cfg["detectors"][n]["type"]).epochs(cfg["detectors"][n], detector_scale(cfg, dataset, n)) * eager
                    for n in names] + [0.0])
    return 0.0


def on_gpu(cfg: dict, stage: str) -> bool:
    """Whether the stage's jobs train or optimise models (the score stage when a detector does)."""
    if stage == "score":
        from ..detectors import DETECTORS

        return any(DETECTORS.get(d["type"]).gpu for d in cfg["detectors"].values())
    return stage in GPU_STAGES


def resources(cfg: dict, stage: str, dataset: str, model: str | None = None, defense: str | None = None) -> dict:
    """What one job of `stage` asks the scheduler for (Snakemake resources); without the job's
    defender model or defense, the rule's most expensive one."""
    cl = cfg["cluster"]
    heavy = on_gpu(cfg, stage)
    gpu = heavy and cl["gpus_per_job"] > 0
    shared = share_group(cfg, stage) is not None
    res = {}
    # Only what the config knows better than the profile's default-resources is set here.
    if heavy:
        # Jobs sharing a GPU may each run up to jobs_per_gpu times slower (when the GPU, not the
        # data loading, was the bottleneck); a group job asks for the longest of its jobs.
        slowdown = cl["jobs_per_gpu"] if shared else 1
        res["runtime"] = int(10 + cl["runtime_margin"] * slowdown
                             * estimated_minutes(cfg, stage, dataset, model, defense=defense))
        if cl.get("max_runtime"):
            res["runtime"] = min(res["runtime"], cl["max_runtime"])
        if cl.get("constraint"):
            res["constraint"] = cl["constraint"]
    mem = cl["gpu_mem_mb"] if heavy else cl["cpu_mem_mb"]
    if mem:
        res["mem_mb"] = mem
    part = cl["partition"] if heavy else (cl["cpu_partition"] or cl["partition"])
    if part:
        res["slurm_partition"] = part
    if cl["account"]:
        res["slurm_account"] = cl["account"]
    if cl.get("qos"):
        res["qos"] = cl["qos"]
    if cl.get("slurm_extra"):
        res["slurm_extra"] = cl["slurm_extra"]
    if gpu and shared:
        # Snakemake sums a group's integer resources over the jobs that run side by side (memory,
        # cores: wanted) but keeps a string one that all its jobs share: one GPU for the group.
        res["gres"] = f"gpu:{cl['gpu_model']}:1" if cl["gpu_model"] else "gpu:1"
    elif gpu:
        n = cl["gpus_per_job"] if stage in DATA_PARALLEL_STAGES else 1
        if cl.get("gpu_request") == "gres":  # sites that accept --gres=gpu:N but not --gpus
            res["gres"] = f"gpu:{cl['gpu_model']}:{n}" if cl["gpu_model"] else f"gpu:{n}"
        else:
            res["gpu"] = n
            if cl["gpu_model"]:
                res["gpu_model"] = cl["gpu_model"]
    return res


def share_group(cfg: dict, stage: str) -> str | None:
    """The Snakemake group of a stage's jobs when cluster.jobs_per_gpu of them share a GPU, else
    None (the rule stays ungrouped). One group per stage: a group holding, say, a cell's pretrain
    and its train would wait on itself (train needs the score made from pretrain's output)."""
    if cfg["cluster"]["jobs_per_gpu"] > 1 and on_gpu(cfg, stage):
        return f"gpu_{stage}"
    return None


def group_components(cfg: dict) -> dict[str, int]:
    """Snakemake's --group-components for the shared-GPU groups: jobs_per_gpu jobs in each."""
    n = cfg["cluster"]["jobs_per_gpu"]
    return {g: n for g in (share_group(cfg, s) for s in (*GPU_STAGES, "score")) if g}


def launcher(cfg: dict, stage: str) -> str:
    """The command a rule runs `poisongrid <stage>` with: torchrun starting one process per GPU
    (data-parallel training) for the training stages when a job has several GPUs, else the CLI."""
    n = cfg["cluster"]["gpus_per_job"]
    if stage in DATA_PARALLEL_STAGES and n > 1 and cfg["device"] != "cpu":
        return f"torchrun --standalone --nproc_per_node {n} -m poisongrid.cli"
    return "poisongrid"
