"""Careless and hostile input: bad configs stop before any job with one line naming the key;
corrupted or mixed-up artifacts stop the stage reading them with one line naming the file."""
import copy
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import yaml

from poisongrid import paths
from poisongrid.cli import main
from poisongrid.io import read_table, write_table

GOOD = {
    "device": "cpu", "bona_fide": {"n_clean": 40},
    "defender_models": {"pretrain": {"r_epoch": 0.5, "augment": "none", "record": "eval"},
                        "teacher": {"model": "resnet_s", "epochs": 2, "optimizer": "adam", "lr": 0.01, "weight_decay": 0}},
    "detectors": {"badloss": {"type": "badloss", "k": 10}, "lfd": {"type": "teacher_loss"}},
    "defenses": {"none": {"remedy": "none"}, "badloss": {"detector": "badloss", "remedy": "remove"},
                 "lfd": {"detector": "lfd", "remedy": "reweight", "alpha": 0.15}},
    "datasets": {"digits": {"image_size": 16, "model": "smallcnn", "epochs": 2, "batch_size": 64, "lr": 0.003,
                            "scenarios": ["multi"],
                            "attacks": {"patch": {"ratio": 0.05}, "blend_random": {"ratio": 0.04, "alpha": 0.1}}}},
}


def _set(cfg, path, value):
    node = cfg
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    if value is DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return cfg


DELETE = object()
D = "datasets.digits"
BAD_CONFIGS = [  # (path, value, text the one-line error must contain)
    ("datasets", DELETE, "datasets"),
    ("colour", "red", "no key 'colour' here"),
    ("device", "tpu", "device"),
    ("device", "cuda", None),  # no GPU here: valid config, but see cluster below
    ("threads", 0, "threads"),
    ("threads", "two", "threads"),
    ("seeds", [], "seeds"),
    ("seeds", [0, 0], "without repeated"),
    ("seeds", [-1], "seeds"),
    ("seeds", 0, "seeds"),
    ("download", "no", "download"),
    ("bona_fide.n_clean", 0, "bona_fide.n_clean"),
    ("bona_fide.n_clean", 100000, "at most"),
    ("bona_fide.stratified", "yes", "bona_fide.stratified"),
    ("bona_fide_sets", [50, 250], "bona_fide_sets"),
    ("bona_fide_sets.n50", 50, "bona_fide_sets.n50"),
    ("bona_fide_sets.n50", {"n_clean": "fifty"}, "bona_fide_sets.n50.n_clean"),
    ("bona_fide_sets.n50", {"n_clean": 50, "stratify": True}, "(did you mean 'stratified'?)"),
    ("bona_fide_sets.n50", {"n_clean": 50, "stratified": "yes"}, "bona_fide_sets.n50.stratified"),
    ("bona_fide_sets.default", {"n_clean": 50}, "bona_fide_sets"),
    ("bona_fide_sets.big", {"n_clean": 100000}, "bona_fide_sets.big.n_clean"),
    ("detectors.badloss.bona_fide", "n50", "one of the bona fide sets ['default']"),
    ("detectors.badloss.bona_fide", 50, "detectors.badloss.bona_fide"),
    ("cluster.gpus_per_job", -1, "cluster.gpus_per_job"),
    ("cluster.runtime_margin", 0.5, "cluster.runtime_margin"),
    (f"{D}.model", "vit", "smallcnn"),
    (f"{D}.loader", "mnist", "digits"),
    (f"{D}.epochs", 0, f"{D}.epochs"),
    (f"{D}.epochs", 2.5, f"{D}.epochs"),
    (f"{D}.epochs", True, f"{D}.epochs"),
    (f"{D}.lr", "1e-3", "with a dot"),
    (f"{D}.lr", 0, f"{D}.lr"),
    (f"{D}.batch_size", 0, f"{D}.batch_size"),
    (f"{D}.augment", "mixup", "crop_flip"),
    (f"{D}.optimizer", "lion", "adamw"),
    (f"{D}.precision", "fp8", "bf16"),
    (f"{D}.crop_scale", [0.9, 0.1], "crop_scale"),
    (f"{D}.image_size", 4, f"{D}.image_size"),
    (f"{D}.options", {"variant": "full"}, "options"),
    (f"{D}.scenarios", ["single-frequency"], "single-patch"),
    (f"{D}.scenarios", [], f"{D}.scenarios"),
    (f"{D}.attacks", {}, f"{D}.attacks"),
    (f"{D}.attacks.trojan", {"ratio": 0.1}, "patch"),
    (f"{D}.attacks.patch.ratio", 1.5, "(0, 1)"),
    (f"{D}.attacks.patch.ratio", 0, "(0, 1)"),
    (f"{D}.attacks.patch.ratio", DELETE, "ratio"),
    (f"{D}.attacks.patch.colour", 3, "patch.colour"),
    (f"{D}.attacks.patch.target", 10, "target"),
    (f"{D}.attacks.patch.target", "one", "target"),
    (f"{D}.attacks.blend_random.alpha", 2.0, "alpha"),
    (f"{D}.attacks.narcissus", {"ratio": 0.02, "eps": 2.0}, "eps"),
    (f"{D}.attacks.blend_random.ratio", 0.97, "less than 1"),
    ("detectors.badloss.k", 41, "n_clean = 40"),
    ("detectors.badloss.k", True, "detectors.badloss.k"),
    ("detectors.badloss.epsilon", "tiny", "detectors.badloss.epsilon"),
    ("detectors.badloss.log_losses", "no", "true or false"),
    ("detectors.badloss.chunk_rows", 0, "chunk_rows"),
    ("detectors.badloss.type", "magic", "badloss"),
    ("detectors.badloss.type", DELETE, "type"),
    ("detectors.badloss.model", "tutor", "defender models"),
    ("detectors.badloss.model", "teacher", "loss per epoch"),
    ("detectors.bad-loss", {"type": "badloss"}, "letters, digits and _"),
    ("defenses.badloss.r_reject", 1.0, "[0, 1)"),
    ("defenses.badloss.r_reject", "0.4", "[0, 1)"),
    ("defenses.badloss.detector", "strip", "badloss"),
    ("defenses.badloss.remedy", "pray", "reweight"),
    ("defenses.badloss.alpha", 0.1, "for remedy 'remove'"),
    ("defenses.lfd.alpha", 1.0, "(0, 1)"),
    ("defenses.lfd.beta", 0, "(0, 1]"),
    ("defenses.lfd.mode", "both", "Eq. 6"),
    ("defenses.none.detector", "badloss", "remedy 'none'"),
    ("defenses.scores", {"remedy": "none"}, "artifact folders"),
    ("datasets.logs", {"loader": "digits", "model": "smallcnn", "attacks": {"patch": {"ratio": 0.05}}}, "folders of the results root"),
    ("defenses.x", {"remedy": "none", "scenarios": ["single-blend"]}, "defenses.x.scenarios"),
    ("defenses.x", {"remedy": "none", "datasets": ["cifar"]}, "defenses.x.datasets"),
    ("defenses.bad.name", {"remedy": "none"}, "defenses"),
    ("defender_models.teacher.model", "resnet18", "no larger than the student"),
    ("defender_models.teacher.model", "resnet_xs", "resnet_s"),
    ("defender_models.teacher.r_epoch", 0.5, "not both"),
    ("defender_models.teacher.record", "never", "record"),
    ("defender_models.attacked", {"epochs": 3}, "dataset's own settings"),
    ("defender_models.teacher.spike_rule", "median", "spike_rule"),
    # The baselines: parameters of the wrong type or range, missing bona fide examples or models.
    ("detectors.nc", {"type": "neural_cleanse", "epochs": 0}, "detectors.nc.epochs"),
    ("detectors.nc", {"type": "neural_cleanse", "lr": "fast"}, "detectors.nc.lr"),
    ("detectors.nc", {"type": "neural_cleanse", "model": "victim"}, "one of the defender models"),
    ("detectors.cd", {"type": "cognitive_distillation", "steps": 2.5}, "detectors.cd.steps"),
    ("detectors.cd", {"type": "cognitive_distillation", "max_images": 100}, "detectors.cd.max_images"),
    ("detectors.ac", {"type": "activation_clustering", "silhouette_threshold": 2}, "silhouette_threshold"),
    ("detectors.ac", {"type": "activation_clustering", "group_by": "colour"}, "group_by"),
    ("detectors.ss", {"type": "spectral_signatures", "per_class_rank": "yes"}, "true or false"),
    ("detectors.freq", {"type": "frequency_analysis", "model": "attacked"}, "detectors.freq.model"),
    ("detectors.abl", {"type": "abl"}, "one of the defender models"),
    ("defender_models.teacher.objective", "hinge", "objective"),
    ("defenses.fp", {"remedy": "fine_prune", "max_acc_drop": 1.5}, "defenses.fp.max_acc_drop"),
    ("defenses.fp", {"remedy": "fine_prune", "model": "victim"}, "defenses.fp.model"),
    ("defenses.ul", {"remedy": "unlearn", "detector": "lfd", "model": "teacher", "r_isolate": 0}, "r_isolate"),
    ("defenses.ul", {"remedy": "unlearn", "detector": "lfd", "model": "teacher"}, "fine-tunes the isolation model"),
    ("defenses.rf", {"remedy": "remove_flagged", "detector": "badloss", "threshold": "high"}, "threshold"),
    ("defenses.pss", {"remedy": "pss_unlearn", "detector": "badloss", "r_poison": 0.5, "r_clean": 0.8}, "r_"),
    ("defenses.cbd", {"remedy": "cbd", "detector": "badloss"}, "one of the defender models"),
]
BAD_CONFIGS = [c for c in BAD_CONFIGS if c[2] is not None]


def test_a_detector_learning_from_bona_fide_examples_needs_some(tmp_path, capsys):
    cfg = copy.deepcopy(GOOD)
    cfg["bona_fide"]["n_clean"] = 0
    cfg["detectors"] = {"freq": {"type": "frequency_analysis"}}
    cfg["defenses"] = {"freq": {"detector": "freq", "remedy": "remove_flagged", "threshold": 0.5}}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bona_fide.n_clean" in err and "frequency_analysis" in err, err


def test_there_are_at_least_fifty_bad_configs():
    assert len(BAD_CONFIGS) >= 50


@pytest.mark.parametrize("path, value, text", BAD_CONFIGS, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD_CONFIGS])
def test_bad_config_stops_with_one_line(tmp_path, capsys, monkeypatch, path, value, text):
    monkeypatch.delenv("POISONGRID_DEBUG", raising=False)
    cfg = _set(copy.deepcopy(GOOD), path, value)
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("poisongrid validate: error: ") and text in err, err


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("datasets:\n  digits: [model: smallcnn\n")
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{f}:" in err and "valid YAML" in err


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path, capsys):
    """Plain YAML keeps the last of a repeated key, silently dropping e.g. a whole defenses block."""
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(GOOD) + "defenses:\n  none: {remedy: none}\n")
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    line = 1 + next(i for i, l in enumerate(f.read_text().splitlines()) if l.startswith("defenses:"))
    assert err.count("\n") == 1 and f"{f}:" in err and "each key once" in err and f"line {line}" in err, err


def _validate(tmp_path, capsys, text: str, lines=1) -> str:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    capsys.readouterr()
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") <= lines and "Traceback" not in err, err
    assert all(len(line) < 400 for line in err.splitlines()), err  # never more than a line of a value
    return err


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path, capsys):
    """Nine levels of ten aliases each: 10^9 values from a file of a few hundred bytes."""
    lines = ["a0: &a0 [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    body = yaml.safe_dump(GOOD) + "\n".join(lines) + "\nseeds: *a9\n"
    assert len(body) < 3000
    err = _validate(tmp_path, capsys, body)
    assert "values with its aliases expanded" in err and "at most 100,000" in err


def test_an_alias_bomb_within_the_bound_is_reported_in_a_line(tmp_path, capsys):
    """Five levels (10^5 seeds would be too many; 4 levels of 10 = 10,000 seeds) reach the schema,
    whose message must not print the expanded value."""
    lines = ["a0: &a0 [[0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1]]"]
    for i in range(1, 4):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    cfg = {k: v for k, v in GOOD.items()}
    err = _validate(tmp_path, capsys, yaml.safe_dump(cfg) + "\n".join(lines) + "\nseeds: *a3\n", lines=20)
    assert "config key 'seeds'" in err and len(err) < 8000


def test_a_huge_config_file_is_refused_by_its_size(tmp_path, capsys):
    big = yaml.safe_dump(GOOD) + "seeds: [" + ", ".join(map(str, range(400_000))) + "]\n"
    err = _validate(tmp_path, capsys, big)
    assert "bytes" in err and "at most 1,048,576" in err


@pytest.mark.parametrize("text, what", [("- seeds: [0]\n- device: cpu\n", "a YAML list"), ("42\n", "a YAML int"),
                                        ("just words\n", "a YAML str")])
def test_a_config_that_is_not_a_mapping_says_what_it_must_be(tmp_path, capsys, text, what):
    err = _validate(tmp_path, capsys, text)
    assert what in err and "a mapping of keys" in err, err


def test_a_ratio_that_poisons_no_image_is_refused_before_any_job(tmp_path, capsys):
    cfg = _set(copy.deepcopy(GOOD), "datasets.digits.attacks.patch.ratio", 0.0001)
    err = _validate(tmp_path, capsys, yaml.safe_dump(cfg))
    assert "datasets.digits.attacks.patch.ratio" in err and "1,437" in err and "min_count" in err, err


def test_a_long_bad_value_is_shown_in_one_short_line(tmp_path, capsys):
    cfg = copy.deepcopy(GOOD)
    cfg["defenses"]["x" * 5000 + "!"] = {"remedy": "none"}
    err = _validate(tmp_path, capsys, yaml.safe_dump(cfg, width=10**6))
    assert "…" in err or "..." in err


# ---- corrupted and mixed-up artifacts -----------------------------------------------------------

W = dict(dataset="digits", scenario="multi", seed=0)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One cell with every artifact the corruptions below touch, made through the CLI."""
    root = tmp_path_factory.mktemp("pristine")
    cfgfile = root / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(GOOD))
    res = root / "results"
    jobs = [("poison", {}), ("bonafide", {}), ("pretrain", {"model": "attacked"}), ("pretrain", {"model": "pretrain"}),
            ("pretrain", {"model": "teacher"}), ("score", {"detector": "badloss"}), ("score", {"detector": "lfd"}),
            ("plan", {"defense": "none"}), ("plan", {"defense": "badloss"}), ("plan", {"defense": "lfd"}),
            ("train", {"defense": "badloss"}), ("evaluate", {"defense": "none"}), ("evaluate", {"defense": "badloss"})]
    for stage, kw in jobs:
        assert main(_args(stage, cfgfile, res, **kw)) == 0, (stage, kw)
    (res / "digits/triggers").mkdir(parents=True, exist_ok=True)
    return cfgfile, res


def _args(stage, cfgfile, res, **kw):
    out = [stage, "--config", str(cfgfile), "--results", str(res), "--dataset", "digits", "--scenario", "multi", "--seed", "0"]
    for k, v in kw.items():
        out += [f"--{k}", v]
    return out


def P(res, kind, **kw):
    return paths.path(kind, str(res), **W, **kw)


def _truncate(p):
    b = open(p, "rb").read()
    open(p, "wb").write(b[: len(b) // 2])


def _garbage(p):
    open(p, "wb").write(b"\x00not this kind of file" * 10)


def _copy(src_kind, **src_kw):
    def f(p, res):
        shutil.copy(P(res, src_kind, **src_kw), p)
    return f


def _drop_column(col):
    def f(p):
        table, meta = read_table(p, json.loads(pa.parquet.ParquetFile(p).metadata.metadata[b"poisongrid"])["kind"])
        write_table(p, table.drop_columns([col]), meta.pop("kind"), meta)
    return f


def _other_seed(p, res):
    other = res.parent / "seed1"
    main(["poison", "--config", str(res.parent / "c.yaml"), "--results", str(other), "--dataset", "digits",
          "--scenario", "multi", "--seed", "1"])
    shutil.copy(paths.path("manifest", str(other), dataset="digits", scenario="multi", seed=1), p)


def _bona_fide_of_seed1(p, res):
    """A bona fide file drawn from another poisoned set (the seed-1 cell's), moved into this cell."""
    other = res.parent / "seed1"
    for stage in ("poison", "bonafide"):
        main([stage, "--config", str(res.parent / "c.yaml"), "--results", str(other), "--dataset", "digits",
              "--scenario", "multi", "--seed", "1"])
    shutil.copy(paths.path("bona_fide", str(other), dataset="digits", scenario="multi", seed=1, bona="default"), p)


def _npz_without_images(p):
    np.savez(open(p, "wb"), something=np.zeros(3))


def _fewer_rows(p):
    table, meta = read_table(p, "trajectories")
    write_table(p, table.slice(0, 100), "trajectories", {k: v for k, v in meta.items() if k != "kind"})


def _edit_parquet(col, fn):
    """Change one column's values and write the file back with its old metadata (digests included),
    as a hand edit or another tool would."""
    def f(p):
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        i = table.column_names.index(col)
        values = table.column(col).to_numpy(zero_copy_only=False).copy()
        table = table.set_column(i, col, pa.array(fn(values), type=table.schema.field(col).type))
        pq.write_table(table.replace_schema_metadata(pq.ParquetFile(p).metadata.metadata), p)
    return f


def _rewrite(col, fn, kind):
    """Change one column and write the file the way the stage does (fresh digests): the content
    itself must be refused."""
    def f(p):
        table, meta = read_table(p, kind)
        i = table.column_names.index(col)
        values = table.column(col).to_numpy(zero_copy_only=False).copy()
        table = table.set_column(i, col, pa.array(fn(values), type=table.schema.field(col).type))
        write_table(p, table, meta.pop("kind"), {k: v for k, v in meta.items() if k != "digests"})
    return f


def _set_first(value):
    def fn(v):
        v[0] = value
        return v
    return fn


def _edit_npz_images(p):
    z = dict(np.load(p))
    z["images"] = z["images"].copy()
    z["images"][0] ^= 1  # one pixel bit; the recorded digests are kept
    np.savez(open(p, "wb"), **z)


def _edit_model_weights(p):
    import torch

    blob = torch.load(p, weights_only=True)
    k = next(iter(blob["state_dict"]))
    blob["state_dict"][k] = blob["state_dict"][k] + 1e-3
    torch.save(blob, p)


def _every_example_bona_fide(p):
    table, meta = read_table(p, "bona_fide")
    table = table.set_column(1, "bona_fide", pa.array(np.ones(table.num_rows, bool)))
    write_table(p, table, meta.pop("kind"), {k: v for k, v in meta.items() if k != "digests"})


def _poisoned_bona_fide(p, res):
    """A bona fide set of the right size that holds poisoned examples."""
    man, _ = read_table(P(res, "manifest"), "manifest")
    attack = man.column("attack").to_pylist()
    table, meta = read_table(p, "bona_fide")
    mask = np.array(table.column("bona_fide").to_pylist())
    poisoned = [i for i, a in enumerate(attack) if a is not None][:5]
    clean_bona = np.flatnonzero(mask)[:5]
    mask[clean_bona] = False
    mask[poisoned] = True
    table = table.set_column(1, "bona_fide", pa.array(mask))
    write_table(p, table, meta.pop("kind"), {k: v for k, v in meta.items() if k != "digests"})


def _shifted_index(p):
    table, meta = read_table(p, "plan")
    table = table.set_column(0, "index", pa.array(table.column("index").to_numpy() + 1))
    write_table(p, table, meta.pop("kind"), {k: v for k, v in meta.items() if k != "digests"})


import pyarrow.parquet  # noqa: E402  (pa.parquet above)

CORRUPTIONS = [  # (what is corrupted, how, the stage that reads it)
    (("manifest", {}), _truncate, ("evaluate", {"defense": "none"})),
    (("manifest", {}), _garbage, ("pretrain", {"model": "attacked"})),
    (("bona_fide", {"bona": "default"}), _drop_column("bona_fide"), ("score", {"detector": "badloss"})),
    (("bona_fide", {"bona": "default"}), _garbage, ("plan", {"defense": "badloss"})),
    (("bona_fide", {"bona": "default"}), _bona_fide_of_seed1, ("train", {"defense": "badloss"})),
    (("manifest", {}), _other_seed, ("evaluate", {"defense": "none"})),
    (("manifest", {}), _copy("plan", defense="none"), ("plan", {"defense": "badloss"})),
    (("poisoned", {}), _truncate, ("pretrain", {"model": "attacked"})),
    (("poisoned", {}), _npz_without_images, ("train", {"defense": "badloss"})),
    (("poisoned", {}), _garbage, ("train", {"defense": "badloss"})),
    (("losses", {"model": "pretrain"}), _truncate, ("score", {"detector": "badloss"})),
    (("losses", {"model": "pretrain"}), _copy("losses", model="teacher"), ("score", {"detector": "badloss"})),
    (("losses", {"model": "pretrain"}), _copy("manifest"), ("score", {"detector": "badloss"})),
    (("losses", {"model": "pretrain"}), _fewer_rows, ("score", {"detector": "badloss"})),
    (("losses", {"model": "teacher"}), _garbage, ("score", {"detector": "lfd"})),
    (("scores", {"detector": "badloss"}), _drop_column("score"), ("plan", {"defense": "badloss"})),
    (("scores", {"detector": "badloss"}), _copy("scores", detector="lfd"), ("plan", {"defense": "badloss"})),
    (("scores", {"detector": "lfd"}), _truncate, ("plan", {"defense": "lfd"})),
    (("plan", {"defense": "badloss"}), _truncate, ("train", {"defense": "badloss"})),
    (("plan", {"defense": "badloss"}), _drop_column("weight"), ("train", {"defense": "badloss"})),
    (("plan", {"defense": "badloss"}), _copy("plan", defense="none"), ("evaluate", {"defense": "badloss"})),
    (("final_model", {"defense": "badloss"}), _truncate, ("evaluate", {"defense": "badloss"})),
    (("final_model", {"defense": "badloss"}), _garbage, ("evaluate", {"defense": "badloss"})),
    (("final_model", {"defense": "badloss"}), _copy("defender_model", model="attacked"), ("evaluate", {"defense": "badloss"})),
    (("defender_model", {"model": "attacked"}), _truncate, ("evaluate", {"defense": "none"})),
    (("defender_model", {"model": "attacked"}), _copy("final_model", defense="badloss"), ("evaluate", {"defense": "none"})),
    # Content changed after writing, metadata (and its digests) intact: refused by the digest.
    (("plan", {"defense": "badloss"}), _edit_parquet("weight", lambda w: 1 - w), ("train", {"defense": "badloss"})),
    (("scores", {"detector": "badloss"}), _edit_parquet("score", lambda s: -s), ("plan", {"defense": "badloss"})),
    (("losses", {"model": "pretrain"}), _edit_parquet("loss_e000", lambda t: t * 2), ("score", {"detector": "badloss"})),
    (("manifest", {}), _edit_parquet("label", lambda y: (y + 1) % 10), ("pretrain", {"model": "attacked"})),
    (("bona_fide", {"bona": "default"}), _edit_parquet("bona_fide", lambda b: ~b), ("plan", {"defense": "badloss"})),
    (("poisoned", {}), _edit_npz_images, ("train", {"defense": "badloss"})),
    (("defender_model", {"model": "attacked"}), _edit_model_weights, ("evaluate", {"defense": "none"})),
    (("final_model", {"defense": "badloss"}), _edit_model_weights, ("evaluate", {"defense": "badloss"})),
    # Content written the stage's way (fresh digests) but impossible: refused by what it holds.
    (("plan", {"defense": "badloss"}), _shifted_index, ("train", {"defense": "badloss"})),
    (("plan", {"defense": "badloss"}), _rewrite("weight", _set_first(1e9), "plan"), ("train", {"defense": "badloss"})),
    (("plan", {"defense": "badloss"}), _rewrite("weight", _set_first(float("nan")), "plan"), ("train", {"defense": "badloss"})),
    (("plan", {"defense": "badloss"}), _rewrite("weight", _set_first(float("inf")), "plan"),
     ("evaluate", {"defense": "badloss"})),
    (("plan", {"defense": "lfd"}), _rewrite("weight", _set_first(1.5), "plan"), ("train", {"defense": "lfd"})),
    (("scores", {"detector": "badloss"}), _rewrite("score", _set_first(float("nan")), "scores"), ("plan", {"defense": "badloss"})),
    (("losses", {"model": "pretrain"}), _rewrite("loss_e000", _set_first(float("inf")), "trajectories"),
     ("score", {"detector": "badloss"})),
    (("bona_fide", {"bona": "default"}), _every_example_bona_fide, ("score", {"detector": "badloss"})),
    (("bona_fide", {"bona": "default"}), _poisoned_bona_fide, ("plan", {"defense": "badloss"})),
]


def test_there_are_at_least_twenty_corruptions():
    assert len(CORRUPTIONS) >= 20


@pytest.mark.parametrize("target, corrupt, reader", CORRUPTIONS,
                         ids=[f"{t[0]}{list(t[1].values())}-{getattr(c, '__name__', 'f')}-{r[0]}" for t, c, r in CORRUPTIONS])
def test_corrupted_artifact_is_refused_naming_the_file(pristine, tmp_path, capsys, monkeypatch, target, corrupt, reader):
    monkeypatch.delenv("POISONGRID_DEBUG", raising=False)
    cfgfile, src = pristine
    res = tmp_path / "results"
    shutil.copytree(src, res)
    shutil.copy(cfgfile, tmp_path / "c.yaml")
    victim = P(res, target[0], **target[1])
    try:
        corrupt(victim, res)
    except TypeError:
        corrupt(victim)
    import os

    outputs = [o for o in paths.outputs(reader[0], str(res), **W, **reader[1]).values() if o != victim]
    for o in outputs:
        if os.path.exists(o):
            os.remove(o)
    capsys.readouterr()
    code = main(_args(reader[0], tmp_path / "c.yaml", res, **reader[1]))
    err = capsys.readouterr().err
    assert code != 0, f"{reader} accepted a corrupted {target}"
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert victim in err, err
    assert not [o for o in outputs if os.path.exists(o)], "a refused stage wrote its outputs"


# ---- a full disk --------------------------------------------------------------------------------

FULL_DISK_JOBS = [("poison", {}, "manifest", {}), ("bonafide", {}, "bona_fide", {"bona": "default"}),
                  ("pretrain", {"model": "attacked"}, "defender_model", {"model": "attacked"}),
                  ("score", {"detector": "badloss"}, "scores", {"detector": "badloss"}),
                  ("plan", {"defense": "badloss"}, "plan", {"defense": "badloss"}),
                  ("train", {"defense": "badloss"}, "final_model", {"defense": "badloss"}),
                  ("evaluate", {"defense": "badloss"}, "metrics", {"defense": "badloss"})]


def _disk_full(*_a, **_k):
    import errno
    import os

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("stage, kw, kind, kind_kw", FULL_DISK_JOBS, ids=[j[0] for j in FULL_DISK_JOBS])
def test_a_full_disk_is_reported_naming_the_file_and_leaves_nothing(pristine, tmp_path, capsys, monkeypatch,
                                                                      stage, kw, kind, kind_kw):
    import os

    monkeypatch.delenv("POISONGRID_DEBUG", raising=False)
    cfgfile, src = pristine
    res = tmp_path / "results"
    shutil.copytree(src, res)
    out = P(res, kind, **kind_kw)
    os.remove(out)
    before = sorted(os.listdir(os.path.dirname(out)))
    monkeypatch.setattr(os, "fsync", _disk_full)  # where a full disk surfaces for every atomic write
    capsys.readouterr()
    code = main(_args(stage, cfgfile, res, **kw))
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and os.path.dirname(out) in err, err
    assert not os.path.exists(out)
    left = [f for f in os.listdir(os.path.dirname(out)) if f not in before]
    assert all(f.endswith(".log") or f.endswith(".running") is False for f in left) and not any(
        f.endswith(".tmp") for f in left), left


def test_a_checkpoint_write_on_a_full_disk_names_the_checkpoint(pristine, tmp_path, capsys, monkeypatch):
    """torch reports a failed write as a RuntimeError ('file write failed'): the stage still says
    'No space left on device' and names the file."""
    import os

    import torch

    monkeypatch.delenv("POISONGRID_DEBUG", raising=False)
    cfgfile, src = pristine
    res = tmp_path / "results"
    shutil.copytree(src, res)
    out = P(res, "defender_model", model="attacked")
    os.remove(out)

    def failing_save(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", failing_save)
    capsys.readouterr()
    assert main(_args("pretrain", cfgfile, res, model="attacked")) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "model.pt" in err, err
    assert not os.path.exists(out)


def test_aggregate_on_a_full_disk_keeps_the_previous_outputs_whole(pristine, tmp_path, capsys, monkeypatch):
    import os

    from poisongrid import aggregate

    cfgfile, src = pristine
    res = tmp_path / "results"
    shutil.copytree(src, res)
    metrics = [P(res, "metrics", defense=d) for d in ("none", "badloss")]
    agg = tmp_path / "agg"
    first = aggregate.run(metrics, agg)
    snapshot = {p: p.read_bytes() for ps in first.values() for p in ps}
    assert len(snapshot) > 5
    # The second run fails at a late write: nothing of it may appear, everything of the first stays.
    real_replace, calls = os.replace, []

    def replace_then_fail(a, b):
        if ".aggregate-" in str(a) and ".aggregate-" not in str(b):  # moving the new outputs into place
            calls.append(b)
            if len(calls) == 4:
                _disk_full()
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    os.utime(metrics[0])
    with pytest.raises(Exception) as e:
        aggregate.run(metrics, agg)
    assert "No space left on device" in str(e.value) and str(calls[3]) in str(e.value)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p: p.read_bytes() for p in snapshot} == snapshot
    assert not [f for f in os.listdir(agg) if f.startswith(".aggregate-")]
