"""Load, default-fill and validate a grid config; cut it into the small spec each stage needs.

The Snakefile and the CLI share these functions, so a stage run by hand sees exactly what
Snakemake would pass it, and each rule's params hold only what changes that stage's output.
"""
from __future__ import annotations

import copy
import functools
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .paths import ATTACKED, DEFAULT_BONA_FIDE, trains_nothing

SCHEMA = json.loads(resources.files("poisongrid").joinpath("schemas/config.schema.json").read_text())

# Training-set sizes of the standard datasets, so impossible budgets fail before any job runs.
KNOWN_TRAIN_SIZES = {"cifar10": 50000, "gtsrb": 26640, "imagenette": 9469, "imagenet": 1281167}
KNOWN_NUM_CLASSES = {"digits": 10, "cifar10": 10, "gtsrb": 43, "imagenette": 10, "imagenet": 1000}
KNOWN_TEST_SIZES = {"digits": 360, "fashion_mnist": 10000, "cifar10": 10000, "gtsrb": 12630, "imagenette": 3925,
                    "imagenet": 50000}

TRAIN_KEYS = ("model", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "loss_clamp", "augment",
              "crop_scale", "precision", "nesterov", "schedule", "milestones", "gamma")
# nesterov, schedule, milestones and gamma have no schema default: a spec carries them only where a
# config sets them, so the caches of configs without them stay valid.


@functools.cache
def _validator_class():
    """A jsonschema validator that also fills in each property's default (the documented recipe)."""
    import jsonschema

    cls = jsonschema.Draft202012Validator
    validate_props = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


def _path(err) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "(top level)"


def _allowed(err) -> str:
    s = err.schema if isinstance(err.schema, dict) else {}
    if err.validator == "type" and isinstance(err.instance, str) and "number" in str(err.validator_value):
        try:
            float(err.instance)
            return f"{err.validator_value} (YAML reads {err.instance} as text: write it with a dot, e.g. 1.0e-3)"
        except ValueError:
            pass
    if err.validator == "uniqueItems":
        return "a list without repeated values"
    if err.validator == "pattern" or (err.validator == "propertyNames"):
        return f"names of letters, digits and _ (they become folder names and workflow wildcards): {err.message}"
    if err.validator == "enum":
        return f"one of {err.validator_value}"
    if err.validator == "additionalProperties":
        return f"only the keys {sorted(s.get('properties', {}))}"
    if err.validator == "required":
        return f"the required key(s) {err.validator_value}"
    return err.message


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML mapping that names a key twice keeps only the last silently in plain YAML loaders;
    in a config that silently drops half of a section, so it is an error here."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                m = key_node.start_mark
                raise ConfigError("config", f"{m.name}:{m.line + 1}:{m.column + 1}",
                                  f"each key once per mapping ('{key}' is also on line {seen[key] + 1})")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """One config file, with file:line:column in the error of bad YAML or a repeated key."""
    p = Path(path)
    if not p.exists():
        raise ConfigError("config", str(p), "a path to an existing YAML file")
    try:
        with open(p, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError("config", where, f"valid YAML ({getattr(e, 'problem', None) or e})") from None


def load(path: str | Path | list | None = None, overrides: dict | None = None, *, deep: bool = True,
         sizes: bool = True) -> dict:
    """Read a YAML config (several: deep-merged in order, as Snakemake merges --configfile files;
    then overrides), fill defaults, validate (`deep=False`, `sizes=False`: see `validate`)."""
    cfg: dict = {}
    for one in ([] if path is None else [path] if isinstance(path, (str, Path)) else path):
        cfg = _merge(cfg, read_yaml(one))
    if overrides:
        cfg = _merge(cfg, overrides)
    return validate(cfg, deep=deep, sizes=sizes)


def typed_overrides(entries) -> dict:
    """`--config KEY=VALUE` entries as Snakemake parses them (nested YAML with every leaf a
    string), with each string leaf read again as YAML: `cluster={gpus_per_job: 0}` gives the
    integer 0, `seeds=[0,1]` a list of integers, `download=true` a boolean."""
    def retype(v):
        if isinstance(v, dict):
            return {k: retype(x) for k, x in v.items()}
        if isinstance(v, list):
            return [retype(x) for x in v]
        if isinstance(v, str):
            try:
                return yaml.safe_load(v) if v.strip() else v
            except yaml.YAMLError:
                return v
        return v

    return {k: retype(v) for k, v in dict(entries or {}).items()}


def results_dir(cfg: dict, configfiles=()) -> str:
    """Where a grid writes: its `results` key, else results/<name of its last config file>, else results."""
    if cfg.get("results"):
        return str(cfg["results"])
    files = list(configfiles or ())
    return f"results/{Path(files[-1]).stem}" if files else "results"


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg: dict, deep: bool = True, sizes: bool = True) -> dict:
    """Fill defaults in place and check everything that can be checked before a job runs.

    `deep=False` fills the same defaults but skips the checks that import torch or read the data
    (model, augmentation and optimizer names, attack parameters, teacher sizes, training-set
    budgets): enough to enumerate the grid's jobs in a fraction of a second. `sizes=False` skips only
    the LfD teachers' size check, the one deep check that may import torch (to count parameters the
    first time, see zoo.parameter_count)."""
    if not isinstance(cfg, dict):
        raise ConfigError("config", cfg, "a mapping of keys")
    for name, ds in (cfg.get("datasets") or {}).items():
        if isinstance(ds, dict) and "narcissus_surrogate" in ds:
            raise ConfigError(f"datasets.{name}.narcissus_surrogate", "{…}",
                              f"nothing here: the surrogate's settings are datasets.{name}.attacks.narcissus.learn")
    errors = sorted(_validator_class()(SCHEMA).iter_errors(cfg), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        # Every schema problem, one line each, so a config is fixed in one round.
        _raise_all([ConfigError(_path(e), e.instance if not isinstance(e.instance, dict) else "{…}", _allowed(e))
                    for e in errors])
    # Each part is checked even when an earlier one failed, so every problem is reported at once.
    problems: list[ConfigError] = []

    def attempt(fn, *a) -> bool:
        try:
            fn(*a)
            return True
        except ConfigError as e:
            problems.append(e)
            return False

    datasets_ok = all([attempt(_check_dataset, name, ds, deep) for name, ds in cfg["datasets"].items()])
    cfg["defender_models"].setdefault(ATTACKED, {})
    models_ok = attempt(_check_defender_models, cfg) if deep else True
    if datasets_ok and models_ok:
        attempt(_check_detectors_defenses, cfg, deep and sizes)
    if deep and datasets_ok:
        attempt(_check_budgets, cfg)
    if cfg["paper_numbers"] is not None:
        from .papers import presets

        if cfg["paper_numbers"] not in presets():
            problems.append(ConfigError("paper_numbers", cfg["paper_numbers"], f"null or one of {presets()}"))
    if cfg["cluster"]["gpus_per_job"] == 0 and cfg["device"] == "cuda":
        problems.append(ConfigError("cluster.gpus_per_job", 0, "at least 1 when device is 'cuda' (or set device: cpu)"))
    if cfg["cluster"]["gpus_per_job"] > 1 and cfg["device"] == "cpu":
        # Several GPUs per job means data-parallel CUDA training; a CPU job would leave them idle.
        problems.append(ConfigError("cluster.gpus_per_job", cfg["cluster"]["gpus_per_job"],
                                    "0 or 1 with device: cpu (more than 1 trains data-parallel on CUDA GPUs: device cuda or auto)"))
    if cfg["cluster"]["jobs_per_gpu"] > 1 and cfg["cluster"]["gpus_per_job"] > 1:
        # Jobs sharing a GPU and one job spread over several GPUs pull in opposite directions.
        problems.append(ConfigError("cluster.jobs_per_gpu", cfg["cluster"]["jobs_per_gpu"],
                                    f"1 when cluster.gpus_per_job is {cfg['cluster']['gpus_per_job']} "
                                    "(several jobs share a GPU only with gpus_per_job 0 or 1)"))
    if problems:
        _raise_all(problems)
    return cfg


def _raise_all(problems: list[ConfigError]) -> None:
    """Raise the first problem, its message listing all of them when there are several."""
    err = problems[0]
    if len(problems) > 1:
        err.args = (f"{len(problems)} problems:\n  " + "\n  ".join(str(p) for p in problems),)
    raise err


def _check_dataset(name: str, ds: dict, deep: bool = True) -> None:
    from .attacks import ATTACKS
    from .data import DATASETS

    ds.setdefault("loader", name)
    DATASETS.get(ds["loader"], f"datasets.{name}.loader")
    if deep:
        from .zoo import AUGMENTS, MODELS, OPTIMIZERS

        MODELS.check(ds["model"], f"datasets.{name}.model")
        AUGMENTS.check(ds["augment"], f"datasets.{name}.augment")
        OPTIMIZERS.check(ds["optimizer"], f"datasets.{name}.optimizer")
    total = 0.0
    for aname, a in ds["attacks"].items():
        key = f"datasets.{name}.attacks.{aname}"
        cls = ATTACKS.get(aname, f"datasets.{name}.attacks")
        r = a["ratio"]
        if not (isinstance(r, (int, float)) and 0 < r < 1):
            raise ConfigError(f"{key}.ratio", r, "a number in (0, 1)")
        total += r
        tgt = a.get("target")
        n_cls = KNOWN_NUM_CLASSES.get(ds["loader"])
        if tgt is not None and (isinstance(tgt, bool) or not isinstance(tgt, int) or tgt < 0 or (n_cls and tgt >= n_cls)):
            raise ConfigError(f"{key}.target", tgt, f"a class index in [0, {n_cls - 1}]" if n_cls else "a class index >= 0")
        params = attack_params(a)
        a["learn"] = cls.check_learn(a.get("learn") or {}, f"{key}.learn", deep)
        if deep:
            # Building the attack once validates its parameters now, not hours into a run (without
            # what it learns: the trigger stage makes that later).
            shape = (3, ds["image_size"] or 32, ds["image_size"] or 32)
            cls(shape, 0, **params)
    if total >= 1 and not ds["overlap"]:
        raise ConfigError(f"datasets.{name}.attacks", f"ratios summing to {total:g}",
                          "ratios summing to less than 1 (or overlap: true, letting attacks share images)")
    ds.setdefault("scenarios", ["multi"] + [f"single-{a}" for a in ds["attacks"]])
    for s in ds["scenarios"]:
        scenario_attacks(ds, s, key=f"datasets.{name}.scenarios")
    cs = ds["crop_scale"]
    if not (0 < cs[0] <= cs[1] <= 1):
        raise ConfigError(f"datasets.{name}.crop_scale", cs, "[lo, hi] with 0 < lo <= hi <= 1")
    from .zoo import check_schedule

    check_schedule(ds, f"datasets.{name}")


def _check_defender_models(cfg: dict) -> None:
    from .zoo import AUGMENTS, MODELS, OPTIMIZERS, check_schedule

    models = cfg["defender_models"]
    att = models[ATTACKED]
    # The attacked model IS the final training on the whole set; only what it records may vary.
    for k in att:
        if k not in ("record", "spike_rule", "spike_factor"):
            raise ConfigError(f"defender_models.{ATTACKED}.{k}", att[k],
                              "only record/spike_rule/spike_factor: it trains with each dataset's own settings")
    for name, m in models.items():
        key = f"defender_models.{name}"
        if "epochs" in m and "r_epoch" in m:
            raise ConfigError(key, {"epochs": m["epochs"], "r_epoch": m["r_epoch"]}, "either epochs or r_epoch, not both")
        if "model" in m:
            MODELS.check(m["model"], f"{key}.model")
        if "augment" in m:
            AUGMENTS.check(m["augment"], f"{key}.augment")
        if "optimizer" in m:
            OPTIMIZERS.check(m["optimizer"], f"{key}.optimizer")
        if "crop_scale" in m and not (0 < m["crop_scale"][0] <= m["crop_scale"][1] <= 1):
            raise ConfigError(f"{key}.crop_scale", m["crop_scale"], "[lo, hi] with 0 < lo <= hi <= 1")
        for dname, ds in cfg["datasets"].items():
            # A model that names its own schedule replaces the dataset's (milestones with it).
            base = {k: v for k, v in ds.items() if k in TRAIN_KEYS and not ("schedule" in m and k in ("milestones", "gamma"))}
            check_schedule({**base, **m}, key)


def _check_detectors_defenses(cfg: dict, teachers: bool = True) -> None:
    from .detectors import DETECTORS
    from .paths import RESERVED
    from .remedies import REMEDIES

    sets = bona_fide_sets(cfg)
    for dname, det in cfg["detectors"].items():
        if det["bona_fide"] not in sets:
            raise ConfigError(f"detectors.{dname}.bona_fide", det["bona_fide"],
                              f"one of the bona fide sets {sorted(sets)} ('{DEFAULT_BONA_FIDE}': the top-level bona_fide; "
                              "the others: bona_fide_sets)")
        cls = DETECTORS.get(det["type"], f"detectors.{dname}.type")
        cls.check(det, f"detectors.{dname}", cfg)
        if cls.default_model:
            det.setdefault("model", cls.default_model)
    for fname in cfg["defenses"]:
        if fname in RESERVED:
            raise ConfigError("defenses", fname, f"a name other than {list(RESERVED)} (artifact folders)")
    known = {"datasets": set(cfg["datasets"]),
             "scenarios": {s for ds in cfg["datasets"].values() for s in ds["scenarios"]}}
    for fname, d in cfg["defenses"].items():
        key = f"defenses.{fname}"
        for where, allowed in known.items():
            for v in d.get(where, []):
                if v not in allowed:
                    raise ConfigError(f"{key}.{where}", v, f"one of the configured {where} {sorted(allowed)}")
        cls = REMEDIES.get(d["remedy"], f"{key}.remedy")
        d.update(cls.check(d, key, cfg))
        if "arch" in d:
            from .zoo import MODELS

            MODELS.check(d["arch"], f"{key}.arch")
    if teachers:
        _check_teachers(cfg)


def _check_teachers(cfg: dict) -> None:
    """LfD's premise is a teacher of lower capacity than the student: a teacher with more
    parameters than a dataset's final model, wherever a reweighting defense uses it, is an error."""
    from .zoo import parameter_count

    cache = Path(cfg["data_dir"]) / ".poisongrid-cache"  # the dataset loaders' cache folder
    for fname, d in cfg["defenses"].items():
        if d["remedy"] != "reweight":
            continue
        det = cfg["detectors"][d["detector"]]
        if det["type"] != "teacher_loss":
            continue
        mname = det["model"]
        for dsname, ds in cfg["datasets"].items():
            if dsname not in d.get("datasets", [dsname]):
                continue
            teacher = cfg["defender_models"][mname].get("model", ds["model"])
            size = ds["image_size"] or 32
            t, s = parameter_count(teacher, 10, size, cache), parameter_count(ds["model"], 10, size, cache)
            if t > s:
                raise ConfigError(f"defender_models.{mname}.model", teacher,
                                  f"a model no larger than the student '{ds['model']}' of dataset '{dsname}' "
                                  f"({t:,} > {s:,} parameters; defense '{fname}' uses it as LfD's teacher)")


def _check_budgets(cfg: dict) -> None:
    for name, ds in cfg["datasets"].items():
        n = train_size(ds, cfg["data_dir"])
        if n is None:
            continue
        counts = [max(int(n * a["ratio"]), a["min_count"]) for a in ds["attacks"].values()]
        # With overlap the poisoned set is at least the largest attack's (its union is drawn at random).
        poisoned = max(counts) if ds["overlap"] else sum(counts)
        pool = n - poisoned
        for set_name, bona in bona_fide_sets(cfg).items():
            if bona["n_clean"] > pool:
                raise ConfigError(f"{bona_fide_key(set_name)}.n_clean", bona["n_clean"],
                                  f"at most {pool}, the untouched examples of '{name}' ({n} training images, {poisoned} poisoned)")


# ---- bona fide sets ----------------------------------------------------------------------------


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


def train_size(ds: dict, data_dir: str = "data") -> int | None:
    """The dataset's training-set size from metadata (headers, file counts), without loading it."""
    from .data import train_size as size

    return size(ds["loader"], data_dir, ds["options"])


# The scenario without any attack: what each defense costs on clean data.
CLEAN = "clean"


def attack_params(a: dict) -> dict:
    """An attack entry minus the scenario-level keys: what the Attack class itself takes."""
    return {k: v for k, v in a.items() if k not in ("ratio", "min_count", "min_target_count", "target", "learn")}


def scenario_attacks(ds: dict, scenario: str, key: str = "scenario") -> list[str]:
    if scenario == "multi":
        return list(ds["attacks"])
    if scenario == CLEAN:
        return []
    if scenario.startswith("single-") and scenario[7:] in ds["attacks"]:
        return [scenario[7:]]
    allowed = ["multi", CLEAN] + [f"single-{a}" for a in ds["attacks"]]
    raise ConfigError(key, scenario, f"one of {allowed}")


# ---- the specs each stage receives -------------------------------------------------------------


def dataset_spec(cfg: dict, dataset: str) -> dict:
    ds = _dataset(cfg, dataset)
    return {"name": dataset, "loader": ds["loader"], "image_size": ds["image_size"], "options": ds["options"],
            "data_dir": cfg["data_dir"], "download": cfg["download"]}


def _dataset(cfg: dict, dataset: str) -> dict:
    if dataset not in cfg["datasets"]:
        raise ConfigError("dataset", dataset, f"one of the configured datasets {sorted(cfg['datasets'])}")
    return cfg["datasets"][dataset]


def runtime_spec(cfg: dict) -> dict:
    # cuda_graphs only when off, so the default leaves every stage's settings (and cache) as they were.
    return {"device": cfg["device"], "threads": cfg["threads"], **({} if cfg["cuda_graphs"] else {"cuda_graphs": False})}


def training_spec(cfg: dict, dataset: str) -> dict:
    ds = _dataset(cfg, dataset)
    return {k: ds[k] for k in TRAIN_KEYS if k in ds}


def final_training_spec(cfg: dict, dataset: str, defense: str) -> dict:
    """The dataset's training settings with the defense's final-model architecture (`arch`), if it names one."""
    arch = _defense(cfg, defense).get("arch")
    return {**training_spec(cfg, dataset), **({"model": arch} if arch else {})}


def defender_model_spec(cfg: dict, dataset: str, name: str) -> dict:
    """How one defender model of a dataset is trained: its training settings (the dataset's,
    overridden by the model's entry), how many epochs run, and what it records."""
    ds = _dataset(cfg, dataset)
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
    ds = _dataset(cfg, dataset)
    spec: dict[str, Any] = {"dataset": dataset_spec(cfg, dataset)}
    if seed is not None:
        spec["seed"] = int(seed)
    if stage == "trigger":
        from .attacks import ATTACKS

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
        from .detectors import DETECTORS

        det = cfg["detectors"][detector]
        if DETECTORS.get(det["type"], "detector type").reads_data():
            spec["seed"] = spec.get("seed", 0)
            spec.update(training=training_spec(cfg, dataset), runtime=runtime_spec(cfg))
        else:
            spec = {}
        spec = {**spec, "detector": detector, **det}
    elif stage == "plan":
        spec = {"defense": defense, **_defense(cfg, defense), "bona_fide": bona_fide_of(cfg, defense=defense)}
    elif stage == "train":
        from .remedies import REMEDIES

        spec["defense"] = {"name": defense, **_defense(cfg, defense)}
        spec["bona_fide"] = bona_fide_of(cfg, defense=defense)
        spec["training"] = final_training_spec(cfg, dataset, defense)
        spec["runtime"] = runtime_spec(cfg)
        if REMEDIES.get(spec["defense"]["remedy"]).uses_validation(spec["defense"]):
            spec["validation"] = dict(cfg["validation"])
    elif stage == "evaluate":
        spec["defense"] = {"name": defense, **_defense(cfg, defense)}
        spec["attacks"] = scenario_attacks(ds, scenario) if scenario else []
        spec["runtime"] = runtime_spec(cfg)
        held_out = validation_spec(cfg, dataset)
        if held_out:
            spec["validation"] = held_out
    else:
        raise ConfigError("stage", stage, "one of trigger, poison, bonafide, pretrain, features, score, plan, train, evaluate")
    return spec


# Keys of a defense that say where it runs, not what it computes (kept out of stage specs).
WHERE_KEYS = ("scenarios", "datasets")


def _defense(cfg: dict, defense: str) -> dict:
    if defense not in cfg["defenses"]:
        raise ConfigError("defense", defense, f"one of the configured defenses {sorted(cfg['defenses'])}")
    return {k: v for k, v in cfg["defenses"][defense].items() if k not in WHERE_KEYS}


def swept_detectors(defenses) -> set[str]:
    """Detectors with >= 2 distinct r_reject values among 'remove' defenses, given (detector,
    remedy, r_reject) triples: those get an r_reject figure. The workflow's report list uses this too."""
    values: dict[str, set[float]] = {}
    for det, remedy, r in defenses:
        if remedy == "remove" and r is not None and not (isinstance(r, float) and math.isnan(r)):
            values.setdefault(det, set()).add(float(r))
    return {d for d, v in values.items() if len(v) >= 2}


def defense_applies(d: dict, dataset: str, scenario: str) -> bool:
    return dataset in d.get("datasets", [dataset]) and scenario in d.get("scenarios", [scenario])


def validation_spec(cfg: dict, dataset: str) -> dict | None:
    """The held-out validation split of a dataset's test set (validation.py) when a defense of
    that dataset reads it, else None (and evaluation scores the whole test set)."""
    from .remedies import REMEDIES

    for d in cfg["defenses"].values():
        if dataset in d.get("datasets", [dataset]) and REMEDIES.get(d["remedy"]).uses_validation(d):
            return dict(cfg["validation"])
    return None


def cells(cfg: dict) -> list[dict]:
    """Every (dataset, scenario, seed, defense) cell of the grid."""
    out = []
    for dname, ds in cfg["datasets"].items():
        for scenario in ds["scenarios"]:
            for seed in cfg["seeds"]:
                for defense, d in cfg["defenses"].items():
                    if defense_applies(d, dname, scenario):
                        out.append({"dataset": dname, "scenario": scenario, "seed": seed, "defense": defense})
    return out


# ---- scheduler resources -------------------------------------------------------------------------

GPU_STAGES = ("trigger", "pretrain", "features", "train")
# Stages whose training runs data-parallel over cluster.gpus_per_job GPUs; the other GPU stages use one.
DATA_PARALLEL_STAGES = ("pretrain", "train")


def dataset_scale(cfg: dict, dataset: str) -> dict:
    """What cost estimates need of a dataset: classes, training-set size (from its files when
    present, else the known size of a standard dataset), bona fide count, epochs."""
    ds = _dataset(cfg, dataset)
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


def estimated_minutes(cfg: dict, stage: str, dataset: str, model: str | None = None, detector: str | None = None,
                      defense: str | None = None, attack: str | None = None) -> float:
    """GPU minutes one job of a stage needs, from the dataset's measured minutes per epoch; the
    most expensive defender model, detector or defense when none is named (a rule-wide limit)."""
    from .costs import cost_factor

    ds = _dataset(cfg, dataset)
    mpe = ds["minutes_per_epoch"]
    # Work outside the graph-replayed training step (detectors' own optimisation, a remedy's
    # per-batch objective, learned triggers) launches every kernel from Python: its own rate.
    eager = ds.get("eager_minutes_per_epoch") or mpe

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
        from .remedies import REMEDIES

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
        from .attacks import ATTACKS

        names = [attack] if attack else [a for a in ds["attacks"] if ATTACKS.get(a).learns()]
        def learned(a):
            cls, s = ATTACKS.get(a), ds["attacks"][a]["learn"]
            graphed = cls.learn_graphed_epochs(s)
            return graphed * mpe + (cls.learn_epochs(s) - graphed) * eager + 5
        return max([learned(a) for a in names] + [0.0])
    if stage == "score":
        from .detectors import DETECTORS

        names = [detector] if detector else list(cfg["detectors"])
        return max([DETECTORS.get(cfg["detectors"][n]["type"]).epochs(cfg["detectors"][n], detector_scale(cfg, dataset, n)) * eager
                    for n in names] + [0.0])
    return 0.0


def on_gpu(cfg: dict, stage: str) -> bool:
    """Whether the stage's jobs train or optimise models (the score stage when a detector does)."""
    if stage == "score":
        from .detectors import DETECTORS

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
    mem = cl["gpu_mem_mb"] if heavy else cl["cpu_mem_mb"]
    if mem:
        res["mem_mb"] = mem
    part = cl["partition"] if heavy else (cl["cpu_partition"] or cl["partition"])
    if part:
        res["slurm_partition"] = part
    if cl["account"]:
        res["slurm_account"] = cl["account"]
    if gpu and shared:
        # Snakemake sums a group's integer resources over the jobs that run side by side (memory,
        # cores: wanted) but keeps a string one that all its jobs share: one GPU for the group.
        res["gres"] = f"gpu:{cl['gpu_model']}:1" if cl["gpu_model"] else "gpu:1"
    elif gpu:
        res["gpu"] = cl["gpus_per_job"] if stage in DATA_PARALLEL_STAGES else 1
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


# ---- figures -------------------------------------------------------------------------------------


def trajectory_detector_types(cfg: dict) -> set[str]:
    """Detector types that read a loss per epoch (their models' trajectories get a figure)."""
    from .detectors import DETECTORS

    return {d["type"] for d in cfg["detectors"].values() if DETECTORS.get(d["type"]).per_epoch}


def capacity_swept(rows) -> bool:
    """Given (remedy, detector type, teacher architecture) of a dataset/scenario's defenses: do
    reweighting defenses on teacher losses use >= 2 teacher architectures (the LfD capacity figure)?"""
    return len({arch for remedy, dtype, arch in rows if remedy == "reweight" and dtype == "teacher_loss"}) >= 2


def model_of_path(path) -> tuple[str, str, int, str]:
    """(dataset, scenario, seed, model) of a defender model's loss file."""
    from .paths import parse, pattern

    w = parse("losses", path)
    if w is None:
        raise ConfigError("defender model file", str(path), f"a path like {pattern('losses')}")
    return w["dataset"], w["scenario"], w["seed"], w["model"]


def figure_name(kind: str, dataset: str, scenario: str, seed: int | None = None, model: str | None = None) -> str:
    tail = f"_seed{seed}_{model}" if seed is not None else ""
    return f"fig_{kind}_{dataset}_{scenario}{tail}.png"


def single_multi_pairs(cfg: dict, dataset: str) -> list[tuple[str, str]]:
    """(defense, attack) pairs that ran both alone (single-<attack>) and in the multi scenario."""
    ds = cfg["datasets"][dataset]
    out = []
    if "multi" not in ds["scenarios"]:
        return out
    for name, d in cfg["defenses"].items():
        if not defense_applies(d, dataset, "multi"):
            continue
        out += [(name, a) for a in ds["attacks"] if f"single-{a}" in ds["scenarios"] and defense_applies(d, dataset, f"single-{a}")]
    return out


def figure_names(cfg: dict, trajectory_paths, teacher_paths) -> list[tuple[str, str, str, str]]:
    """(kind, file name, label, dataset) of every figure `poisongrid aggregate` draws for this config."""
    out = []
    pairs = list(dict.fromkeys((c["dataset"], c["scenario"]) for c in cells(cfg)))
    for ds, sc in pairs:
        if sc != CLEAN:
            out.append(("asr", figure_name("asr", ds, sc), f"{ds} — {sc}", ds))
        here = [d for d in cfg["defenses"].values() if defense_applies(d, ds, sc)]
        if swept_detectors((d.get("detector"), d["remedy"], d.get("r_reject")) for d in here):
            out.append(("rreject", figure_name("rreject", ds, sc), f"{ds} — {sc}", ds))
        rows = []
        for d in here:
            if d.get("detector"):
                det = cfg["detectors"][d["detector"]]
                if det.get("model"):
                    arch = cfg["defender_models"][det["model"]].get("model", cfg["datasets"][ds]["model"])
                    rows.append((d["remedy"], det["type"], arch))
        if capacity_swept(rows):
            out.append(("capacity", figure_name("capacity", ds, sc), f"{ds} — {sc}", ds))
    for ds in dict.fromkeys(ds for ds, _ in pairs):
        if single_multi_pairs(cfg, ds):
            out.append(("singlemulti", figure_name("singlemulti", ds, "all"), ds, ds))
    for kind, paths in (("trajectories", trajectory_paths), ("teacher", teacher_paths)):
        for p in paths:
            ds, sc, seed, m = model_of_path(p)
            out.append((kind, figure_name(kind, ds, sc, seed, m), f"{ds} — {sc}, seed {seed}, {m}", ds))
    return out
