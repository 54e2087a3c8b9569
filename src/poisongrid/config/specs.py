"""Cutting a validated config into the small spec each stage of one cell depends on (and nothing
else), and the grid's cells, scenarios and bona fide sets that the specs are made from."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..paths import DEFAULT_BONA_FIDE

if TYPE_CHECKING:
    from ..defender import BonaFideSet


# Training-set sizes of the standard datasets, so impossible budgets fail before any job runs.
KNOWN_TRAIN_SIZES = {"cifar10": 50000, "gtsrb": 26640, "imagenette": 9469, "imagenet": 1281167}
KNOWN_NUM_CLASSES = {"digits": 10, "cifar10": 10, "gtsrb": 43, "imagenette": 10, "imagenet": 1000}
KNOWN_TEST_SIZES = {"digits": 360, "fashion_mnist": 10000, "cifar10": 10000, "gtsrb": 12630, "imagenette": 3925,
                    "imagenet": 50000}

TRAIN_KEYS = ("model", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "loss_clamp", "augment",
              "crop_scale", "precision", "nesterov", "schedule", "milestones", "gamma", "bn_recalibration")
# nesterov, schedule, milestones, gamma and bn_recalibration have no schema default: a spec carries
# them only where a config sets them, so the caches of configs without them stay valid.


def bona_fide_sets(cfg: dict) -> dict[str, dict]:
    """name -> settings of every bona fide set: the top-level `bona_fide` as 'default', then `bona_fide_sets`."""
    return {DEFAULT_BONA_FIDE: cfg["bona_fide"], **cfg.get("bona_fide_sets", {})}


def bona_fide_key(name: str) -> str:
    """Where a set is configured, for error messages."""
    return "bona_fide" if name == DEFAULT_BONA_FIDE else f"bona_fide_sets.{name}"


def bona_fide_set(cfg: dict, det: dict | None) -> tuple[str, int]:
    """The name and size (n_clean) of the bona fide set a detector entry reads (None: the default)."""
    name = (det or {}).get("bona_fide", DEFAULT_BONA_FIDE)
    return name, bona_fide_sets(cfg)[name]["n_clean"]


def resolved_bona_fide(cfg: dict, detector: str | None = None, defense: str | None = None) -> BonaFideSet:
    """The bona fide set a detector (or a defense, through its detector) reads, as the plug-ins'
    config checks receive it."""
    from ..defender import BonaFideSet

    name, n = _named_bona_fide_set(cfg, detector, defense)
    return BonaFideSet(name, n, bona_fide_key(name))


def bona_fide_of(cfg: dict, detector: str | None = None, defense: str | None = None) -> str:
    """The bona fide set a detector reads; that of a defense is its detector's (the plan must
    know every example the scores treated as bona fide), else the default."""
    return _named_bona_fide_set(cfg, detector, defense)[0]


def n_clean_of(cfg: dict, detector: str | None = None, defense: str | None = None) -> int:
    return _named_bona_fide_set(cfg, detector, defense)[1]


def _named_bona_fide_set(cfg: dict, detector: str | None, defense: str | None) -> tuple[str, int]:
    if defense is not None:
        detector = cfg["defenses"][defense].get("detector")
    return bona_fide_set(cfg, cfg["detectors"][detector] if detector is not None else None)


_TRAIN_SIZES: dict[tuple, int | None] = {}


def train_size(ds: dict, data_dir: str = "data") -> int | None:
    """The dataset's training-set size from metadata (headers, file counts), without loading it;
    read once per process (the workflow asks for it for every GPU job's runtime, and counting a
    folder of images means listing it)."""
    import json

    from ..data import train_size as size

    key = (ds["loader"], str(data_dir), json.dumps(ds["options"], sort_keys=True, default=str))
    if key not in _TRAIN_SIZES:
        _TRAIN_SIZES[key] = size(ds["loader"], data_dir, ds["options"])
    return _TRAIN_SIZES[key]


# The scenario without any attack: what each defense costs on clean data.
CLEAN = "clean"


def scenario_attacks(ds: dict, scenario: str, key: str = "scenario") -> list[str]:
    if scenario == "multi":
        return list(ds["attacks"])
    if scenario == CLEAN:
        return []
    if scenario.startswith("single-") and scenario[7:] in ds["attacks"]:
        return [scenario[7:]]
    allowed = ["multi", CLEAN] + [f"single-{a}" for a in ds["attacks"]]
    raise ConfigError(key, scenario, f"one of {allowed}")


def dataset_spec(cfg: dict, dataset: str) -> dict:
    ds = dataset_entry(cfg, dataset)
    return {"name": dataset, "loader": ds["loader"], "image_size": ds["image_size"], "options": ds["options"],
            "data_dir": cfg["data_dir"], "download": cfg["download"]}


def dataset_entry(cfg: dict, dataset: str) -> dict:
    """A dataset's entry of the config (an error naming the configured ones if unknown)."""
    if dataset not in cfg["datasets"]:
        raise ConfigError("dataset", dataset, f"one of the configured datasets {sorted(cfg['datasets'])}")
    return cfg["datasets"][dataset]


def runtime_spec(cfg: dict) -> dict:
    # cuda_graphs only when off and cpu_channels_last only when on, so the defaults leave every
    # stage's settings (and cache) as they were.
    return {"device": cfg["device"], "threads": cfg["threads"], **({} if cfg["cuda_graphs"] else {"cuda_graphs": False}),
            **({"cpu_channels_last": True} if cfg["cpu_channels_last"] else {})}


def training_spec(cfg: dict, dataset: str) -> dict:
    ds = dataset_entry(cfg, dataset)
    return {k: ds[k] for k in TRAIN_KEYS if k in ds}


def final_training_spec(cfg: dict, dataset: str, defense: str) -> dict:
    """The dataset's training settings with the defense's final-model architecture (`arch`), if it names one."""
    arch = defense_entry(cfg, defense).get("arch")
    return {**training_spec(cfg, dataset), **({"model": arch} if arch else {})}


def defender_model_spec(cfg: dict, dataset: str, name: str) -> dict:
    """How one defender model of a dataset is trained: its training settings (the dataset's,
    overridden by the model's entry), how many epochs run, and what it records."""
    ds = dataset_entry(cfg, dataset)
    if name not in cfg["defender_models"]:
        raise ConfigError("model", name, f"one of the defender models {sorted(cfg['defender_models'])}")
    m = cfg["defender_models"][name]
    base = training_spec(cfg, dataset)
    if "schedule" in m:  # its own schedule replaces the dataset's, milestones and all
        base = {k: v for k, v in base.items() if k not in ("milestones", "gamma")}
    training = {**base, **{k: m[k] for k in TRAIN_KEYS if k in m}}
    if "r_epoch" in m:
        # BaDLoss: stop early; the cosine schedule still spans the dataset's full run.
        training["epochs"] = ds["epochs"]
        run = max(1, round(m["r_epoch"] * ds["epochs"]))
    else:
        run = int(training["epochs"])
    for k in ("objective", "objective_level"):
        if k in m:
            training[k] = m[k]
    return {"name": name, "training": training, "run": run, "record": m.get("record", "final"),
            "spike_rule": m.get("spike_rule", "paper"), "spike_factor": m.get("spike_factor", 2.0)}


def stage_spec(cfg: dict, stage: str, dataset: str, scenario: str | None = None, seed: int | None = None,
               defense: str | None = None, detector: str | None = None, model: str | None = None,
               attack: str | None = None, bona: str | None = None) -> dict:
    """The part of the config one stage of one cell depends on (and nothing else)."""
    ds = dataset_entry(cfg, dataset)
    spec: dict[str, Any] = {"dataset": dataset_spec(cfg, dataset)}
    if seed is not None:
        spec["seed"] = int(seed)
    if stage == "trigger":
        from ..attacks import ATTACKS

        learning = sorted(a for a in ds["attacks"] if ATTACKS.get(a).learns())
        if attack not in learning:
            raise ConfigError("attack", attack, f"an attack of dataset '{dataset}' that learns something first: {learning}")
        spec["attack"] = attack
        spec["params"] = {k: v for k, v in ds["attacks"][attack].items() if k != "learn"}
        spec["learn"] = ds["attacks"][attack]["learn"]
        # An attacker's models take their own architecture and epochs from `learn`; the dataset's
        # model and epochs are the defender's and must not rerun it.
        spec["training"] = {k: v for k, v in training_spec(cfg, dataset).items() if k not in ("model", "epochs")}
        spec["runtime"] = runtime_spec(cfg)
    elif stage == "poison":
        names = scenario_attacks(ds, scenario)
        spec["scenario"] = scenario
        spec["attacks"] = {a: ds["attacks"][a] for a in names}
        spec["all_attacks"] = list(ds["attacks"])  # targets are drawn in this order for every scenario
        if ds["overlap"] and len(names) > 1:
            # Only where attacks can meet, so turning it on reruns just those scenarios.
            spec["overlap"] = True
    elif stage == "bonafide":
        sets = bona_fide_sets(cfg)
        bona = bona or DEFAULT_BONA_FIDE
        if bona not in sets:
            raise ConfigError("bona", bona, f"one of the bona fide sets {sorted(sets)}")
        spec["scenario"] = scenario
        spec["bona"] = bona
        spec["bona_fide"] = sets[bona]
    elif stage == "pretrain":
        spec["model"] = defender_model_spec(cfg, dataset, model)
        spec["runtime"] = runtime_spec(cfg)
    elif stage == "features":
        spec["model"] = model
        spec["runtime"] = runtime_spec(cfg)
    elif stage == "score":
        if detector not in cfg["detectors"]:
            raise ConfigError("detector", detector, f"one of {sorted(cfg['detectors'])}")
        from ..detectors import DETECTORS

        det = cfg["detectors"][detector]
        if DETECTORS.get(det["type"], "detector type").reads_data():
            spec["seed"] = spec.get("seed", 0)
            spec.update(training=training_spec(cfg, dataset), runtime=runtime_spec(cfg))
        else:
            spec = {}
        spec = {**spec, "detector": detector, **det}
    elif stage == "plan":
        spec = {"defense": defense, **defense_entry(cfg, defense), "bona_fide": bona_fide_of(cfg, defense=defense)}
    elif stage == "train":
        from ..remedies import REMEDIES

        spec["defense"] = {"name": defense, **defense_entry(cfg, defense)}
        spec["bona_fide"] = bona_fide_of(cfg, defense=defense)
        spec["training"] = final_training_spec(cfg, dataset, defense)
        spec["runtime"] = runtime_spec(cfg)
        if REMEDIES.get(spec["defense"]["remedy"]).uses_validation(spec["defense"]):
            spec["validation"] = dict(cfg["validation"])
    elif stage == "evaluate":
        spec["defense"] = {"name": defense, **defense_entry(cfg, defense)}
        spec["attacks"] = scenario_attacks(ds, scenario) if scenario else []
        spec["runtime"] = runtime_spec(cfg)
        held_out = validation_spec(cfg, dataset)
        if held_out:
            spec["validation"] = held_out
    else:
        raise ConfigError("stage", stage, "one of trigger, poison, bonafide, pretrain, features, score, plan, train, evaluate")
    return spec


# Keys of a defense that say where it runs, not what it computes (kept out of stage specs and of
# what a remedy checks).
WHERE_KEYS = ("scenarios", "datasets")


def defense_entry(cfg: dict, defense: str) -> dict:
    """A defense's entry without the keys saying where it runs (an error if unknown)."""
    if defense not in cfg["defenses"]:
        raise ConfigError("defense", defense, f"one of the configured defenses {sorted(cfg['defenses'])}")
    return {k: v for k, v in cfg["defenses"][defense].items() if k not in WHERE_KEYS}


def defense_applies(d: dict, dataset: str, scenario: str) -> bool:
    return dataset in d.get("datasets", [dataset]) and scenario in d.get("scenarios", [scenario])


def validation_spec(cfg: dict, dataset: str) -> dict | None:
    """The held-out validation split of a dataset's test set (validation.py) when a defense of
    that dataset reads it, else None (and evaluation scores the whole test set)."""
    from ..remedies import REMEDIES

    for d in cfg["defenses"].values():
        if dataset in d.get("datasets", [dataset]) and REMEDIES.get(d["remedy"]).uses_validation(d):
            return dict(cfg["validation"])
    return None


def scenario_seeds(cfg: dict, ds: dict, scenario: str) -> list[int]:
    """The seeds a scenario runs: those of the first `scenario_seeds` pattern of its dataset that
    matches its name (shell-style, e.g. single-*), else the grid's."""
    from fnmatch import fnmatchcase

    for pattern, seeds in (ds.get("scenario_seeds") or {}).items():
        if fnmatchcase(scenario, pattern):
            return list(seeds)
    return list(cfg["seeds"])


def cells(cfg: dict) -> list[dict]:
    """Every (dataset, scenario, seed, defense) cell of the grid."""
    out = []
    for dname, ds in cfg["datasets"].items():
        for scenario in ds["scenarios"]:
            for seed in scenario_seeds(cfg, ds, scenario):
                for defense, d in cfg["defenses"].items():
                    if defense_applies(d, dname, scenario):
                        out.append({"dataset": dname, "scenario": scenario, "seed": seed, "defense": defense})
    return out
