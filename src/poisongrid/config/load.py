"""Reading and validating a grid config: YAML files merged in order, overrides, defaults filled
from the JSON schema, then every value checked against the registries before any job runs, all
problems reported at once (one line each)."""
from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..paths import ATTACKED, DEFAULT_BONA_FIDE
from .specs import (
    KNOWN_NUM_CLASSES,
    TRAIN_KEYS,
    WHERE_KEYS,
    bona_fide_key,
    bona_fide_sets,
    resolved_bona_fide,
    scenario_attacks,
    train_size,
)


SCHEMA = json.loads(resources.files("poisongrid").joinpath("schemas/config.schema.json").read_text())


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
        return "names of letters, digits and _ (they become folder names and workflow wildcards)"
    if err.validator == "enum":
        return f"one of {err.validator_value}"
    if err.validator == "additionalProperties":
        return f"only the keys {sorted(s.get('properties', {}))}"
    if err.validator == "required":
        return f"the required key(s) {err.validator_value}"
    message = " ".join(err.message.split())  # jsonschema's message quotes the whole value
    return message if len(message) <= 160 else message[:159] + "…"


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


# Bounds on what a config may be, checked before anything walks it: a grid's config is a few
# kilobytes; a file of megabytes or a YAML alias that expands a list into millions of values is a
# mistake (or worse), which validating would take minutes and gigabytes to find.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000


def _expanded_size(node, memo: dict) -> int:
    """How many values a YAML node stands for with every alias expanded (a node reached through
    several aliases counts each time), computed once per node."""
    key = id(node)
    if key not in memo:
        memo[key] = 0  # a recursive alias counts as nothing more while it is being measured
        if isinstance(node, yaml.MappingNode):
            n = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            n = 1 + sum(_expanded_size(v, memo) for v in node.value)
        else:
            n = 1
        memo[key] = n
    return memo[key]


def read_yaml(path: str | Path) -> dict:
    """One config file, with file:line:column in the error of bad YAML or a repeated key; a file
    over MAX_CONFIG_BYTES or expanding to more than MAX_CONFIG_VALUES values is refused before it
    is built, and the file must hold a mapping of keys."""
    p = Path(path)
    if not p.exists():
        raise ConfigError("config", str(p), "a path to an existing YAML file")
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError("config", f"{p} ({size:,} bytes)", f"a file of at most {MAX_CONFIG_BYTES:,} bytes (a grid's "
                          "config is a few kilobytes)")
    try:
        with open(p, encoding="utf-8") as fh:
            loader = _UniqueKeyLoader(fh)
            try:
                node = loader.get_single_node()
                if node is None:
                    return {}
                values = _expanded_size(node, {})
                if values > MAX_CONFIG_VALUES:
                    raise ConfigError("config", f"{p} ({values:,} values with its aliases expanded)",
                                      f"at most {MAX_CONFIG_VALUES:,} values (is an alias repeating a list?)")
                cfg = loader.construct_document(node)
            finally:
                loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError("config", where, f"valid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError("config", str(p), f"a UTF-8 text file ({e.reason} at byte {e.start})") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError("config", f"{p} (a YAML {type(cfg).__name__})", "a mapping of keys, e.g. 'seeds: [0]' on its own "
                          "line (the file holds a list or a single value)")
    return cfg


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

    out: dict = {}
    for k, v in dict(entries or {}).items():
        # The dotted form of Hydra and friends: datasets.digits.epochs=8 is datasets={digits: {epochs: 8}}.
        keys = str(k).split(".")
        if not all(keys):
            raise ConfigError("--config", k, "KEY=VALUE with a key of names joined by dots, e.g. datasets.digits.epochs=8")
        node = {keys[-1]: retype(v)}
        for key in reversed(keys[:-1]):
            node = {key: node}
        out = _merge(out, node)
    return out


def parse_overrides(entries) -> dict:
    """Command-line `KEY=YAML` entries (the form Snakemake's --config takes, dotted keys allowed) as
    a nested dict of typed values."""
    pairs = {}
    for e in entries or ():
        key, eq, value = str(e).partition("=")
        if not eq or not key.strip():
            raise ConfigError("--config", e, "KEY=VALUE entries, e.g. seeds=[0,1] or datasets.digits.epochs=8 "
                              "(a config file goes after --configfile)")
        pairs[key.strip()] = value
    return typed_overrides(pairs)


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
    first time, see model_sizes.parameter_count)."""
    if not isinstance(cfg, dict):
        raise ConfigError("config", cfg, "a mapping of keys")
    from ..paths import RESERVED_DATASETS

    for name, ds in (cfg.get("datasets") or {}).items():
        if name in RESERVED_DATASETS:
            raise ConfigError("datasets", name, f"a name other than {list(RESERVED_DATASETS)} (folders of the results "
                              "root), e.g. with loader: set to the dataset it loads")
        if isinstance(ds, dict) and "narcissus_surrogate" in ds:
            raise ConfigError(f"datasets.{name}.narcissus_surrogate", "{…}",
                              f"nothing here: the surrogate's settings are datasets.{name}.attacks.narcissus.learn")
    errors = sorted(_validator_class()(SCHEMA).iter_errors(cfg), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        # Every schema problem, one line each, so a config is fixed in one round.
        _raise_all([_schema_problem(e, cfg) for e in errors])
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
        from ..papers import presets

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


def _schema_problem(err, cfg: dict) -> ConfigError:
    """One schema violation as the user should read it: an unknown key named itself, with the
    nearest known key; a new name under defenses/detectors/datasets that lacks its required keys,
    with the nearest name the config already defines (a typo in an override creates one)."""
    from ..errors import did_you_mean

    s = err.schema if isinstance(err.schema, dict) else {}
    path = _path(err)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        known = sorted(s.get("properties", {}))
        extra = sorted(str(k) for k in err.instance if k not in known)
        if extra:
            key = extra[0] if path == "(top level)" else f"{path}.{extra[0]}"
            v = err.instance[extra[0]]
            return ConfigError(key, "{…}" if isinstance(v, dict) else v,
                               f"no key '{extra[0]}' here{did_you_mean(extra[0], known)}: the keys are {known}")
    if err.validator == "required" and len(err.absolute_path) == 2 and \
            err.absolute_path[0] in ("defenses", "detectors", "datasets", "defender_models"):
        section, name = err.absolute_path[0], str(err.absolute_path[1])
        others = [n for n in (cfg.get(section) or {}) if n != name]
        hint = did_you_mean(name, others)
        if hint:
            return ConfigError(path, "{…}", f"a {section[:-1].replace('_', ' ')} this config defines{hint}, or a new one "
                               f"with the required key(s) {err.validator_value}")
    return ConfigError(path, err.instance if not isinstance(err.instance, dict) else "{…}", _allowed(err))


def _raise_all(problems: list[ConfigError]) -> None:
    """Raise the first problem, its message listing all of them when there are several."""
    err = problems[0]
    if len(problems) > 1:
        err.args = (f"{len(problems)} problems:\n  " + "\n  ".join(str(p) for p in problems),)
    raise err


def _check_dataset(name: str, ds: dict, deep: bool = True) -> None:
    from ..attacks import ATTACKS
    from ..data import DATASETS

    ds.setdefault("loader", name)
    DATASETS.get(ds["loader"], f"datasets.{name}.loader")
    if deep:
        from ..zoo import AUGMENTS, MODELS, OPTIMIZERS

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
        from ..attacks.base import attack_params

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
    from fnmatch import fnmatchcase

    for pattern in ds.get("scenario_seeds") or {}:
        if not any(fnmatchcase(s, pattern) for s in ds["scenarios"]):
            raise ConfigError(f"datasets.{name}.scenario_seeds", pattern,
                              f"a pattern matching one of the dataset's scenarios {ds['scenarios']} (e.g. single-*)")
    cs = ds["crop_scale"]
    if not (0 < cs[0] <= cs[1] <= 1):
        raise ConfigError(f"datasets.{name}.crop_scale", cs, "[lo, hi] with 0 < lo <= hi <= 1")
    from ..zoo import check_schedule

    check_schedule(ds, f"datasets.{name}")


def _check_defender_models(cfg: dict) -> None:
    from ..zoo import AUGMENTS, MODELS, OPTIMIZERS, check_schedule

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
    from ..detectors import DETECTORS
    from ..paths import RESERVED
    from ..remedies import REMEDIES

    sets = bona_fide_sets(cfg)
    for dname, det in cfg["detectors"].items():
        if det["bona_fide"] not in sets:
            raise ConfigError(f"detectors.{dname}.bona_fide", det["bona_fide"],
                              f"one of the bona fide sets {sorted(sets)} ('{DEFAULT_BONA_FIDE}': the top-level bona_fide; "
                              "the others: bona_fide_sets)")
        cls = DETECTORS.get(det["type"], f"detectors.{dname}.type")
        cls.check(det, f"detectors.{dname}", cfg, resolved_bona_fide(cfg, detector=dname))
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
        entry = {k: v for k, v in d.items() if k not in WHERE_KEYS}
        detector = d.get("detector") if d.get("detector") in cfg["detectors"] else None
        d.update(cls.check(entry, key, cfg, resolved_bona_fide(cfg, detector=detector)))
        if "arch" in d:
            from ..zoo import MODELS

            MODELS.check(d["arch"], f"{key}.arch")
    if teachers:
        _check_teachers(cfg)


def _check_teachers(cfg: dict) -> None:
    """LfD's premise is a teacher of lower capacity than the student: a teacher with more
    parameters than a dataset's final model, wherever a reweighting defense uses it, is an error."""
    from ..model_sizes import parameter_count

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


# A detector that reads a loss per epoch needs a few of them: BaDLoss's kNN over trajectories of
# fewer points says little more than one loss does.
MIN_TRAJECTORY_EPOCHS = 5


def warnings(cfg: dict) -> list[str]:
    """What is allowed but probably not meant: per-epoch detectors whose defender model records
    fewer than MIN_TRAJECTORY_EPOCHS epochs on some dataset (after overrides, typically)."""
    from ..detectors import DETECTORS
    from .specs import defender_model_spec

    out = []
    for dname, det in cfg["detectors"].items():
        cls = DETECTORS.get(det["type"])
        if not cls.per_epoch or not det.get("model"):
            continue
        for ds in cfg["datasets"]:
            run = defender_model_spec(cfg, ds, det["model"])["run"]
            if run < MIN_TRAJECTORY_EPOCHS:
                out.append(f"detectors.{dname} ({det['type']}) reads a loss per epoch of defender model '{det['model']}', "
                           f"which records {run} epoch{'s' if run != 1 else ''} on {ds} (fewer than "
                           f"{MIN_TRAJECTORY_EPOCHS}: short trajectories rank poorly; raise its r_epoch or the dataset's epochs)")
    return out


def check_data(cfg: dict) -> None:
    """Refuse a grid whose data is not where its loaders read it (unless `download` fetches it), so
    a wrong data_dir or path stops the run before any job instead of failing every poison job."""
    from ..data import check_present
    from ..errors import DatasetError

    if cfg.get("download"):
        return
    for name, ds in cfg["datasets"].items():
        try:
            check_present(ds["loader"], cfg["data_dir"], ds["options"])
        except DatasetError as e:
            raise DatasetError(f"datasets.{name}: {e}") from None


def _check_budgets(cfg: dict) -> None:
    for name, ds in cfg["datasets"].items():
        n = train_size(ds, cfg["data_dir"])
        if n is None:
            continue
        counts = [max(int(n * a["ratio"]), a["min_count"]) for a in ds["attacks"].values()]
        for (aname, a), k in zip(ds["attacks"].items(), counts):
            if k < 1:
                raise ConfigError(f"datasets.{name}.attacks.{aname}.ratio", a["ratio"],
                                  f"a ratio that poisons at least one of the {n:,} training images (at least {1 / n:.2g}), "
                                  "or set min_count")
        # With overlap the poisoned set is at least the largest attack's (its union is drawn at random).
        poisoned = max(counts) if ds["overlap"] else sum(counts)
        pool = n - poisoned
        for set_name, bona in bona_fide_sets(cfg).items():
            if bona["n_clean"] > pool:
                raise ConfigError(f"{bona_fide_key(set_name)}.n_clean", bona["n_clean"],
                                  f"at most {pool}, the untouched examples of '{name}' ({n} training images, {poisoned} poisoned)")
