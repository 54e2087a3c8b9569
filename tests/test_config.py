import copy
from pathlib import Path

import pytest
import yaml

from poisongrid import config
from poisongrid.errors import ConfigError

BASE = {
    "datasets": {"digits": {"model": "smallcnn", "epochs": 2, "attacks": {"patch": {"ratio": 0.05}, "sinusoid": {"ratio": 0.02}}}},
    "bona_fide": {"n_clean": 50},
    "defender_models": {"pretrain": {"r_epoch": 0.3, "augment": "none", "record": "eval"},
                        "teacher": {"model": "resnet_s", "epochs": 4, "optimizer": "adam", "weight_decay": 0}},
    "detectors": {"badloss": {"type": "badloss", "k": 10}, "lfd": {"type": "teacher_loss"}},
    "defenses": {"none": {"remedy": "none"}, "badloss": {"detector": "badloss", "remedy": "remove", "r_reject": 0.4},
                 "lfd": {"detector": "lfd", "remedy": "reweight"}},
}


def cfg(**patch):
    c = copy.deepcopy(BASE)
    for path, value in patch.items():
        node = c
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return c


def test_defaults_filled_and_cells():
    c = config.validate(cfg())
    assert c["defender_models"]["pretrain"] == {"r_epoch": 0.3, "augment": "none", "record": "eval"} and c["seeds"] == [0]
    assert c["defender_models"]["attacked"] == {} and c["detectors"]["badloss"]["model"] == "pretrain"
    assert c["datasets"]["digits"]["scenarios"] == ["multi", "single-patch", "single-sinusoid"]
    assert len(config.cells(c)) == 3 * 3


@pytest.mark.parametrize("patch, key, allowed", [
    ({"datasets__digits__loader": "mnist"}, "datasets.digits.loader", "digits"),
    ({"datasets__digits__model": "vit"}, "datasets.digits.model", "smallcnn"),
    ({"datasets__digits__attacks": {"trojan": {"ratio": 0.1}}}, "datasets.digits.attacks", "patch"),
    ({"datasets__digits__attacks__patch__ratio": 1.5}, "datasets.digits.attacks.patch.ratio", "(0, 1)"),
    ({"datasets__digits__attacks__patch__ratio": 0}, "datasets.digits.attacks.patch.ratio", "(0, 1)"),
    ({"datasets__digits__attacks": {"patch": {"ratio": 0.6}, "blend_random": {"ratio": 0.5}}}, "datasets.digits.attacks", "less than 1"),
    ({"datasets__digits__attacks__patch__colour": 3}, "attacks.patch.colour", "one of"),
    ({"bona_fide__n_clean": 5000}, "bona_fide.n_clean", "at most"),
    ({"detectors__badloss__k": 51}, "detectors.badloss.k", "n_clean = 50"),
    ({"defenses__badloss__r_reject": 1.0}, "defenses.badloss.r_reject", "[0, 1)"),
    ({"defenses__badloss__r_reject": -0.1}, "defenses.badloss.r_reject", "[0, 1)"),
    ({"defenses__badloss__detector": "strip"}, "defenses.badloss.detector", "badloss"),
    ({"defenses__badloss__remedy": "pray"}, "defenses.badloss.remedy", "one of"),
    ({"detectors__badloss__type": "magic"}, "detectors.badloss.type", "badloss"),
    ({"datasets__digits__scenarios": ["single-frequency"]}, "datasets.digits.scenarios", "single-patch"),
    ({"device": "tpu"}, "device", "one of"),
    ({"defenses__models": {"remedy": "none"}}, "defenses", "artifact folders"),
    ({"defenses__badloss__alpha": 0.1}, "defenses.badloss.alpha", "for remedy 'remove'"),
    ({"defenses__lfd": {"detector": "lfd", "remedy": "reweight", "alpha": 0}}, "defenses.lfd.alpha", "(0, 1)"),
    ({"defenses__lfd": {"detector": "lfd", "remedy": "reweight", "alpha": 1}}, "defenses.lfd.alpha", "(0, 1)"),
    ({"defenses__lfd": {"detector": "lfd", "remedy": "reweight", "beta": 0}}, "defenses.lfd.beta", "(0, 1]"),
    ({"defenses__lfd": {"detector": "lfd", "remedy": "reweight", "beta": 1.5}}, "defenses.lfd.beta", "(0, 1]"),
    ({"defenses__lfd": {"detector": "lfd", "remedy": "reweight", "alpha": "0.1"}}, "defenses.lfd.alpha", "(0, 1)"),
    ({"defenses__lfd": {"detector": "lfd", "remedy": "reweight", "mode": "both"}}, "defenses.lfd.mode", "Eq. 6"),
    ({"defender_models__teacher__model": "resnet_xs"}, "defender_models.teacher.model", "resnet_s"),
    ({"defender_models__teacher__model": "resnet18"}, "defender_models.teacher.model", "no larger than the student 'smallcnn'"),
    ({"detectors__lfd__model": "tutor"}, "detectors.lfd.model", "one of the defender models"),
    ({"detectors__badloss__model": "teacher"}, "defender_models.teacher.record", "loss per epoch"),
    ({"defender_models__attacked": {"epochs": 3}}, "defender_models.attacked.epochs", "dataset's own settings"),
    ({"defender_models__teacher__epochs": 3, "defender_models__teacher__r_epoch": 0.5}, "defender_models.teacher", "not both"),
    ({"defender_models__teacher__optimizer": "lion"}, "defender_models.teacher.optimizer", "adamw"),
    ({"datasets__digits__augment": "mixup"}, "datasets.digits.augment", "crop_flip_zero"),
    ({"detectors__badloss__log_losses": "no"}, "detectors.badloss.log_losses", "true or false"),
    ({"detectors__badloss__k": True}, "detectors.badloss.k", "integer"),
    ({"datasets__digits__epochs": 0}, "datasets.digits.epochs", "minimum"),
    ({"datasets__digits__overlap": "yes"}, "datasets.digits.overlap", "boolean"),
    ({"datasets__digits__overlap": 1}, "datasets.digits.overlap", "boolean"),
])
def test_bad_input_names_key_value_and_allowed(patch, key, allowed):
    with pytest.raises(ConfigError) as e:
        config.validate(cfg(**patch))
    msg = str(e.value)
    assert key in msg and allowed in msg


def test_stage_specs_are_minimal():
    c = config.validate(cfg())
    f = config.stage_spec(c, "plan", "digits", "multi", 0, "badloss")
    assert f == {"defense": "badloss", "detector": "badloss", "remedy": "remove", "r_reject": 0.4, "bona_fide": "default"}
    p = config.stage_spec(c, "pretrain", "digits", "multi", 0, model="pretrain")
    assert set(p) == {"dataset", "seed", "model", "runtime"}
    assert p["model"]["run"] == 1 and p["model"]["training"]["epochs"] == 2 and p["model"]["record"] == "eval"
    # A defense's parameters are not part of the pretrain spec, so changing them reuses the trajectories.
    c2 = config.validate(cfg(defenses__badloss__r_reject=0.2, defenses__lfd__alpha=0.3))
    for m in ("pretrain", "teacher", "attacked"):
        assert config.stage_spec(c2, "pretrain", "digits", "multi", 0, model=m) == \
            config.stage_spec(c, "pretrain", "digits", "multi", 0, model=m)
    assert config.stage_spec(c2, "score", "digits", "multi", 0, detector="badloss") == \
        config.stage_spec(c, "score", "digits", "multi", 0, detector="badloss")


def test_defender_models_take_the_datasets_settings_unless_overridden():
    c = config.validate(cfg())
    att = config.defender_model_spec(c, "digits", "attacked")
    # The attacked model is exactly the final training on everything (the `none` defense's model).
    assert att["training"] == config.stage_spec(c, "train", "digits", "multi", 0, "none")["training"]
    assert att["run"] == 2 and att["record"] == "final"
    t = config.defender_model_spec(c, "digits", "teacher")
    assert t["training"]["model"] == "resnet_s" and t["training"]["optimizer"] == "adam" and t["run"] == 4
    assert t["training"]["epochs"] == 4  # its own schedule; r_epoch models keep the dataset's
    from poisongrid.jobs import cell_jobs

    models = [j["model"] for s, j in cell_jobs(c, "digits", "multi", 0, list(c["defenses"])) if s == "pretrain"]
    assert models == ["attacked", "pretrain", "teacher"]


def test_defense_restricted_to_scenarios():
    c = cfg()
    c["defenses"]["badloss_r20"] = {"detector": "badloss", "remedy": "remove", "r_reject": 0.2, "scenarios": ["multi"]}
    c = config.validate(c)
    cells = [(x["scenario"], x["defense"]) for x in config.cells(c)]
    assert ("multi", "badloss_r20") in cells and ("single-patch", "badloss_r20") not in cells
    assert "scenarios" not in config.stage_spec(c, "plan", "digits", "multi", 0, "badloss_r20")
    bad = cfg()
    bad["defenses"]["x"] = {"remedy": "none", "scenarios": ["single-blend"]}
    with pytest.raises(ConfigError, match="defenses.x.scenarios"):
        config.validate(bad)


def test_shipped_configs_are_valid():
    for path in ("config.yaml", "configs/demo.yaml", "configs/imagenet.yaml", "configs/lfd-paper.yaml"):
        c = config.load(path)
        assert config.cells(c)
    raw = yaml.safe_load(open("config.yaml"))
    assert raw["datasets"]["cifar10"]["attacks"]["narcissus"]["ratio"] == 0.0005


def test_missing_config_file():
    with pytest.raises(ConfigError, match="existing YAML"):
        config.load("nope.yaml")


def test_scheduler_resources_follow_the_config():
    c = cfg()
    c["cluster"] = {"partition": "a100", "cpu_partition": "cpu", "account": "lab", "gpu_model": "a100", "gpus_per_job": 1}
    c["datasets"]["digits"].update(epochs=100, minutes_per_epoch=0.5)
    c = config.validate(c)
    train = config.resources(c, "train", "digits")
    assert train == {"runtime": int(10 + 1.5 * 100 * 0.5), "gpu": 1, "gpu_model": "a100", "slurm_partition": "a100",
                     "slurm_account": "lab"}
    score = config.resources(c, "score", "digits")
    assert "gpu" not in score and score["slurm_partition"] == "cpu" and "runtime" not in score
    c2 = config.validate(cfg(device="cpu", cluster={"gpus_per_job": 0}))
    assert "gpu" not in config.resources(c2, "pretrain", "digits")
    with pytest.raises(ConfigError, match="cluster.gpus_per_job"):
        config.validate(cfg(device="cuda", cluster={"gpus_per_job": 0}))
    assert config.launcher(c, "train") == "poisongrid"
    # Site settings a cluster user adds: a QoS and sbatch extras for every job, node features and a
    # cap on the computed time limit for the GPU jobs (a capped job resumes from its checkpoint).
    c["cluster"].update(qos="normal", constraint="a100|h100", slurm_extra="--mail-type=FAIL", max_runtime=60)
    c = config.validate(c)
    train = config.resources(c, "train", "digits")
    assert train["runtime"] == 60 and train["constraint"] == "a100|h100" and train["qos"] == "normal"
    assert train["slurm_extra"] == "--mail-type=FAIL"
    score = config.resources(c, "score", "digits")
    assert score["qos"] == "normal" and "constraint" not in score and "runtime" not in score
    c["cluster"].update(gpu_request="gres")
    train = config.resources(config.validate(c), "train", "digits")
    assert train["gres"] == "gpu:a100:1" and "gpu" not in train and "gpu_model" not in train


def test_several_gpus_per_job_train_data_parallel_and_only_the_training_stages_ask_for_them():
    c = config.validate(cfg(device="cuda", cluster={"gpus_per_job": 4}))
    for stage in ("pretrain", "train"):
        assert config.resources(c, stage, "digits")["gpu"] == 4
        assert config.launcher(c, stage) == "torchrun --standalone --nproc_per_node 4 -m poisongrid.cli"
    for stage in ("trigger", "features"):
        assert config.resources(c, stage, "digits")["gpu"] == 1
        assert config.launcher(c, stage) == "poisongrid"
    assert config.launcher(config.validate(cfg(device="auto", cluster={"gpus_per_job": 2})), "pretrain").startswith("torchrun")
    # Several GPUs for a CPU job would sit idle: refused before any job runs.
    with pytest.raises(ConfigError, match="'cluster.gpus_per_job' = 2"):
        config.validate(cfg(device="cpu", cluster={"gpus_per_job": 2}))


def test_trigger_spec_ignores_the_final_runs_model_and_epochs():
    narc = {"narcissus": {"ratio": 0.02}}
    a = config.stage_spec(config.validate(cfg(datasets__digits__attacks=narc)), "trigger", "digits", seed=0, attack="narcissus")
    b = config.stage_spec(config.validate(cfg(datasets__digits__attacks=narc, datasets__digits__epochs=50,
                                              datasets__digits__model="resnet18")), "trigger", "digits", seed=0,
                          attack="narcissus")
    assert a == b


@pytest.mark.parametrize("patch, key, allowed", [
    ({"seeds": [0, 0]}, "seeds", "without repeated"),
    ({"datasets__digits__lr": "1e-3"}, "datasets.digits.lr", "write it with a dot"),
    ({"detectors__bad-loss": {"type": "badloss"}}, "detectors", "letters, digits and _"),
    ({"datasets__digits__epochs": True}, "datasets.digits.epochs", "integer"),
])
def test_yaml_traps_and_names_that_break_the_workflow(patch, key, allowed):
    with pytest.raises(ConfigError) as e:
        config.validate(cfg(**patch))
    assert key in str(e.value) and allowed in str(e.value)


def test_all_schema_problems_are_listed_and_yaml_errors_name_the_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.validate(cfg(seeds=[0, 0], device="tpu", datasets__digits__epochs=0))
    msg = str(e.value)
    assert msg.startswith("3 problems") and "seeds" in msg and "device" in msg and "datasets.digits.epochs" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets:\n  digits: {model: smallcnn\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3:1"):
        config.load(bad)


def test_problems_in_several_parts_are_reported_together():
    c = cfg(datasets__digits__model="vit", device="cuda", cluster={"gpus_per_job": 0})
    with pytest.raises(ConfigError) as e:
        config.validate(c)
    msg = str(e.value)
    assert msg.startswith("2 problems") and "datasets.digits.model" in msg and "cluster.gpus_per_job" in msg


def test_overlap_option_reaches_only_the_poison_specs_where_attacks_can_meet():
    off, on = config.validate(cfg()), config.validate(cfg(datasets__digits__overlap=True))
    assert off["datasets"]["digits"]["overlap"] is False
    assert "overlap" not in config.stage_spec(off, "poison", "digits", "multi", 0)
    assert config.stage_spec(on, "poison", "digits", "multi", 0)["overlap"] is True
    # One attack alone cannot share an image: its cached poisoned set stays valid.
    assert config.stage_spec(on, "poison", "digits", "single-patch", 0) == config.stage_spec(off, "poison", "digits", "single-patch", 0)
    for stage, kw in (("pretrain", {"model": "pretrain"}), ("train", {"defense": "badloss"})):
        assert config.stage_spec(on, stage, "digits", "multi", 0, **kw) == config.stage_spec(off, stage, "digits", "multi", 0, **kw)
    # Ratios may then sum to 1 or more (each still below 1).
    big = {"patch": {"ratio": 0.6}, "blend_random": {"ratio": 0.5}}
    config.validate(cfg(datasets__digits__attacks=big, datasets__digits__overlap=True))
    with pytest.raises(ConfigError, match="overlap: true"):
        config.validate(cfg(datasets__digits__attacks=big))


def test_shipped_imagenette_and_imagenet_blends_use_alpha_015():
    """The authors' code blends at one alpha, 0.15, on Imagenette and ImageNet for all three blends
    (Blend-R, Blend-P, Sinusoid); elsewhere 0.075 / 0.025 / 0.075."""
    import glob

    from poisongrid.attacks import ATTACKS

    seen = set()
    for path in ["config.yaml", *sorted(glob.glob("configs/*.yaml"))]:
        for name, ds in (yaml.safe_load(open(path)).get("datasets") or {}).items():
            if ds.get("loader", name) not in ("imagenette", "imagenet"):
                continue
            for attack in ("blend_random", "blend_pattern", "sinusoid"):
                if attack in ds["attacks"]:
                    alpha = ds["attacks"][attack].get("alpha", ATTACKS.get(attack).defaults["alpha"])
                    assert alpha == 0.15, (path, name, attack, alpha)
                    seen.add((path, attack))
    # Every paper preset with these datasets carries all three blends.
    for path in ("config.yaml", "configs/badloss-paper.yaml", "configs/imagenet.yaml"):
        assert {a for p, a in seen if p == path} == {"blend_random", "blend_pattern", "sinusoid"}, path


def test_a_defense_arch_sets_the_final_models_architecture():
    from poisongrid import jobs, paths

    c = config.validate(cfg(defenses__none_r18={"remedy": "none", "arch": "resnet18"},
                            defenses__badloss_r18={"detector": "badloss", "remedy": "remove", "arch": "resnet18"}))
    for d in ("none_r18", "badloss_r18"):
        assert config.stage_spec(c, "train", "digits", "multi", 0, d)["training"]["model"] == "resnet18"
    assert config.stage_spec(c, "train", "digits", "multi", 0, "badloss")["training"]["model"] == "smallcnn"
    # Without arch, `none` is the attacked model; with one it trains its own undefended model.
    assert paths.trains_nothing(c["defenses"]["none"]) and not paths.trains_nothing(c["defenses"]["none_r18"])
    stages = [(s, j.get("defense")) for s, j in jobs.cell_jobs(c, "digits", "multi", 0, ["none", "none_r18"])]
    assert ("train", "none_r18") in stages and ("train", "none") not in stages
    ev = paths.inputs("evaluate", config.stage_spec(c, "evaluate", "digits", "multi", 0, "none_r18"),
                      dataset="digits", scenario="multi", seed=0, defense="none_r18")
    assert ev["weights"].endswith("/none_r18/model.pt")


@pytest.mark.parametrize("patch,key,allowed", [
    ({"defenses__badloss__arch": "densenet"}, "defenses.badloss.arch", "densenet121"),
    ({"defenses__abl": {"detector": "badloss", "remedy": "unlearn", "model": "teacher", "arch": "resnet18"}},
     "defenses.abl.arch", "defender_models.teacher.model"),
])
def test_bad_arch_is_named(patch, key, allowed):
    with pytest.raises(ConfigError) as e:
        config.validate(cfg(**patch))
    assert key in str(e.value) and allowed in str(e.value)


def test_estimates_scale_by_the_architectures_cost():
    from poisongrid.costs import GMACS

    c = cfg(defenses__badloss_d={"detector": "badloss_d", "remedy": "remove", "arch": "densenet121"},
            defender_models__pretrain_d={"model": "densenet121", "epochs": 4, "record": "eval"},
            detectors__badloss_d={"type": "badloss", "model": "pretrain_d"})
    c["datasets"]["digits"].update(model="resnet50", image_size=32, epochs=10, minutes_per_epoch=0.5)
    c = config.validate(c, deep=False)
    ratio = GMACS["densenet121"][0] / GMACS["resnet50"][0]
    assert config.estimated_minutes(c, "train", "digits", defense="badloss") == pytest.approx(10 * 0.5)
    assert config.estimated_minutes(c, "train", "digits", defense="badloss_d") == pytest.approx(10 * 0.5 * ratio)
    # 4 epochs plus the per-epoch eval pass (x1.3).
    assert config.estimated_minutes(c, "pretrain", "digits", model="pretrain_d") == pytest.approx(4 * 0.5 * ratio * 1.3)
    assert config.estimated_minutes(c, "features", "digits", model="pretrain_d") == pytest.approx(0.5 * 0.5 * ratio + 2)
    # Each train job asks the scheduler for its own architecture's time; the rule-wide default is the costliest.
    assert config.resources(c, "train", "digits", defense="badloss")["runtime"] == int(10 + 1.5 * 10 * 0.5)
    assert config.resources(c, "train", "digits")["runtime"] == int(10 + 1.5 * 10 * 0.5 * ratio)


def test_eager_work_is_estimated_at_the_eager_rate(monkeypatch):
    """CBD's objective, GPU detectors and learned triggers run outside the captured training step:
    they take eager_minutes_per_epoch; every other training the graph-replayed rate. grid
    estimates add each GPU job's start once."""
    from poisongrid import estimate

    c = cfg(defenses__cbd={"detector": "cbd", "remedy": "cbd", "model": "backdoored"},
            defender_models__backdoored={"epochs": 5, "record": "final"},
            detectors__cbd={"type": "cbd", "model": "backdoored"},
            detectors__nc={"type": "neural_cleanse", "model": "attacked"},
            defenses__nc={"detector": "nc", "remedy": "remove_flagged"})
    c["datasets"]["digits"].update(epochs=10, minutes_per_epoch=0.1, eager_minutes_per_epoch=0.4)
    c = config.validate(c, deep=False)
    assert config.estimated_minutes(c, "train", "digits", defense="badloss") == pytest.approx(10 * 0.1)
    assert config.estimated_minutes(c, "train", "digits", defense="cbd") == pytest.approx(2.02 * 10 * 0.4)
    nc = config.estimated_minutes(c, "score", "digits", detector="nc")
    c2 = copy.deepcopy(c)
    c2["datasets"]["digits"]["eager_minutes_per_epoch"] = None
    assert nc == pytest.approx(4 * config.estimated_minutes(c2, "score", "digits", detector="nc")) and nc > 0
    assert config.estimated_minutes(c2, "train", "digits", defense="cbd") == pytest.approx(2.02 * 10 * 0.1)
    rows = estimate.estimate(c)
    gpu_jobs = sum(r["jobs"] for r in rows if r["gpu_hours"] > 0)
    monkeypatch.setattr(estimate, "GPU_JOB_START_MINUTES", 0.0)
    bare = sum(r["gpu_hours"] for r in estimate.estimate(c))
    assert gpu_jobs > 0
    assert sum(r["gpu_hours"] for r in rows) - bare == pytest.approx(gpu_jobs * 0.3 / 60)


def _two_sets(**extra):
    c = cfg(**extra)
    c["bona_fide_sets"] = {"n20": {"n_clean": 20}, "s40": {"n_clean": 40, "stratified": True}}
    c["detectors"]["badloss_n20"] = {"type": "badloss", "k": 10, "bona_fide": "n20"}
    c["defenses"]["badloss_n20"] = {"detector": "badloss_n20", "remedy": "remove", "r_reject": 0.4}
    return c


def test_bona_fide_sets_specs_and_jobs():
    """A detector's set reaches its score spec and the plan and training of defenses using it;
    other defenses read the default; a cell draws each set in use once."""
    from poisongrid import paths
    from poisongrid.jobs import cell_jobs

    c = config.validate(_two_sets())
    assert c["bona_fide_sets"]["n20"] == {"n_clean": 20, "stratified": False}
    assert config.bona_fide_of(c, defense="badloss_n20") == "n20" and config.bona_fide_of(c, defense="none") == "default"
    b = config.stage_spec(c, "bonafide", "digits", "multi", 0, bona="s40")
    assert b["bona_fide"] == {"n_clean": 40, "stratified": True} and b["bona"] == "s40"
    assert config.stage_spec(c, "bonafide", "digits", "multi", 0)["bona_fide"] == {"n_clean": 50, "stratified": False}
    for stage, kw in (("score", {"detector": "badloss_n20"}), ("plan", {"defense": "badloss_n20"}),
                      ("train", {"defense": "badloss_n20"})):
        spec = config.stage_spec(c, stage, "digits", "multi", 0, **kw)
        got = paths.inputs(stage, spec, "r", dataset="digits", scenario="multi", seed=0, **kw)["bona_fide"]
        assert got == "r/digits/multi/seed0/bona_fide/n20.parquet", (stage, got)
    spec = config.stage_spec(c, "plan", "digits", "multi", 0, defense="badloss")
    assert paths.inputs("plan", spec, "r", dataset="digits", scenario="multi", seed=0, defense="badloss")["bona_fide"] \
        == "r/digits/multi/seed0/bona_fide/default.parquet"
    # The score spec of a default-set detector is unchanged by adding sets: its scores are reused.
    assert config.stage_spec(c, "score", "digits", "multi", 0, detector="badloss") == \
        config.stage_spec(config.validate(cfg()), "score", "digits", "multi", 0, detector="badloss")
    jobs = cell_jobs(c, "digits", "multi", 0, ["none", "badloss", "badloss_n20"])
    assert [j["bona"] for s, j in jobs if s == "bonafide"] == ["default", "n20"]  # s40: no detector reads it
    assert [j["bona"] for s, j in cell_jobs(c, "digits", "multi", 0, ["badloss_n20"]) if s == "bonafide"] == ["n20"]


def test_a_detector_is_checked_against_its_own_bona_fide_set():
    c = _two_sets()
    c["detectors"]["badloss_n20"]["k"] = 30  # fits the default's 50, not its own set's 20
    with pytest.raises(ConfigError, match=r"detectors.badloss_n20.k.*bona_fide_sets.n20.n_clean = 20"):
        config.validate(c)
    c = _two_sets()
    c["detectors"]["freq"] = {"type": "frequency_analysis", "bona_fide": "none0"}
    c["bona_fide_sets"]["none0"] = {"n_clean": 0}
    with pytest.raises(ConfigError, match=r"bona_fide_sets.none0.n_clean.*at least 10"):
        config.validate(c)
    c = _two_sets()
    c["detectors"]["badloss_n20"]["bona_fide"] = "n30"
    with pytest.raises(ConfigError, match=r"detectors.badloss_n20.bona_fide.*one of the bona fide sets \['default', 'n20', 's40'\]"):
        config.validate(c)
    c = _two_sets()
    c["bona_fide_sets"]["s40"]["n_clean"] = 5000  # digits: 1437 training images
    with pytest.raises(ConfigError, match=r"bona_fide_sets.s40.n_clean.*at most"):
        config.validate(c)


def test_jobs_sharing_a_gpu_form_one_group_per_stage_asking_for_one_gpu():
    one = config.validate(cfg(device="cuda", cluster={"gpus_per_job": 1, "gpu_mem_mb": 4000}))
    shared = config.validate(cfg(device="cuda", cluster={"gpus_per_job": 1, "gpu_mem_mb": 4000, "jobs_per_gpu": 3}))
    assert one["cluster"]["jobs_per_gpu"] == 1
    for stage in ("trigger", "pretrain", "features", "train"):
        # jobs_per_gpu 1 leaves every rule ungrouped with the resources it always had.
        assert config.share_group(one, stage) is None and config.resources(one, stage, "digits")["gpu"] == 1
        assert config.share_group(shared, stage) == f"gpu_{stage}"
        r, r1 = config.resources(shared, stage, "digits"), config.resources(one, stage, "digits")
        # A string resource is kept, not summed, over a group: one GPU for the group's 3 jobs;
        # memory stays per job (Snakemake sums it over jobs that run side by side).
        assert "gpu" not in r and r["gres"] == "gpu:1" and r["mem_mb"] == 4000
        # Each of the 3 may run up to 3x slower on the shared GPU.
        est = config.estimated_minutes(shared, stage, "digits")
        assert (r["runtime"], r1["runtime"]) == (int(10 + 1.5 * 3 * est), int(10 + 1.5 * est))
    assert config.share_group(shared, "score") is None and config.share_group(shared, "poison") is None
    assert config.group_components(shared) == {f"gpu_{s}": 3 for s in ("trigger", "pretrain", "features", "train")}
    assert config.group_components(one) == {}
    # The stage specs (what outputs depend on) do not see the scheduler's grouping.
    assert config.stage_spec(one, "pretrain", "digits", seed=0, model="pretrain") == \
        config.stage_spec(shared, "pretrain", "digits", seed=0, model="pretrain")
    model = config.validate(cfg(device="cuda", cluster={"gpu_model": "a100", "jobs_per_gpu": 2}))
    r = config.resources(model, "train", "digits")
    assert r["gres"] == "gpu:a100:1" and "gpu_model" not in r and "gpu" not in r
    # Without GPUs (gpus_per_job 0) the jobs still share one allocation, asking for no GPU.
    cpu = config.validate(cfg(device="cpu", cluster={"gpus_per_job": 0, "jobs_per_gpu": 2}))
    assert config.share_group(cpu, "pretrain") == "gpu_pretrain" and "gres" not in config.resources(cpu, "pretrain", "digits")


def test_jobs_per_gpu_is_checked():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="cluster.jobs_per_gpu"):
            config.validate(cfg(device="cuda", cluster={"jobs_per_gpu": bad}))
    # Sharing a GPU between jobs and spreading a job over several GPUs exclude each other.
    with pytest.raises(ConfigError, match="'cluster.jobs_per_gpu' = 2.*gpus_per_job is 4"):
        config.validate(cfg(device="cuda", cluster={"gpus_per_job": 4, "jobs_per_gpu": 2}))
    config.validate(cfg(device="cuda", cluster={"gpus_per_job": 4, "jobs_per_gpu": 1}))


def test_scenario_seeds_run_each_attack_alone_with_fewer_seeds():
    from poisongrid import estimate

    c = config.validate(cfg(seeds=[0, 1, 2], datasets__digits__scenario_seeds={"single-*": [0]}))
    got = {(x["scenario"], x["seed"]) for x in config.cells(c)}
    assert got == {("multi", 0), ("multi", 1), ("multi", 2), ("single-patch", 0), ("single-sinusoid", 0)}
    # The estimate (and so the workflow's targets) counts the same cells.
    poison = sum(r["jobs"] for r in estimate.estimate(c) if r["stage"] == "poison")
    assert poison == 5
    with pytest.raises(ConfigError, match="scenario_seeds"):
        config.validate(cfg(datasets__digits__scenario_seeds={"single-frequency": [0]}))


def test_every_command_takes_configfiles_and_dotted_overrides(tmp_path, capsys, monkeypatch):
    """validate, status, estimate and a stage: --configfile FILE... and --config KEY=YAML...,
    dotted keys included; the stage also keeps its older --config FILE."""
    from poisongrid.cli import main

    monkeypatch.chdir(tmp_path)
    base = {"device": "cpu", "seeds": [0], "defenses": {"none": {"remedy": "none"}},
            "datasets": {"digits": {"model": "smallcnn", "epochs": 2, "scenarios": ["single-patch"], "minutes_per_epoch": 1.0,
                                    "attacks": {"patch": {"ratio": 0.05}}}}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "more.yaml").write_text(yaml.safe_dump({"seeds": [0, 1, 2]}))
    over = ["--config", "datasets.digits.epochs=7", "results=out/variant"]

    assert main(["validate", "g.yaml", "--configfile", "more.yaml", *over]) == 0
    out = capsys.readouterr().out
    assert "g.yaml + more.yaml with overrides: valid; 1 dataset(s), 3 cell(s); results go to out/variant" in out
    assert main(["validate", "--configfile", "g.yaml"]) == 0
    assert "results go to results/g" in capsys.readouterr().out

    assert main(["estimate", "--configfile", "g.yaml", *over]) == 0
    est = capsys.readouterr().out
    assert main(["estimate", "--configfile", "g.yaml"]) == 0
    assert est != capsys.readouterr().out  # 7 epochs cost more than 2

    assert main(["status", "--configfile", "g.yaml", *over]) == 0
    assert "not started" in capsys.readouterr().out

    for cfg_args in (["--configfile", "g.yaml"], ["--config", "g.yaml"]):  # the newer and the older form
        assert main(["poison", *cfg_args, "--config", "results=out/stage", "--dataset", "digits",
                     "--scenario", "single-patch", "--seed", "0"]) == 0
        assert (tmp_path / "out/stage/digits/single-patch/seed0/poison/manifest.parquet").exists()

    capsys.readouterr()
    assert main(["validate", "--configfile", "g.yaml", "--config", "epochs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KEY=VALUE" in err and "datasets.digits.epochs=8" in err


def test_minutes_per_epoch_is_derived_from_the_data_and_model_when_not_measured(tmp_path):
    """A dataset without minutes_per_epoch gets one from its size, image size and model at the
    rates measured on one H200: never shorter than a measured epoch, at most about twice as long."""
    from poisongrid.costs import derived_minutes_per_epoch

    measured = [  # (images, model, px, measured images/s) from the README's GPU benchmarks
        (50_000, "resnet50", 32, 25_940), (50_000, "resnet18", 32, 125_462), (9_469, "resnet50", 224, 4_294)]
    for n, model, px, rate in measured:
        ratio = derived_minutes_per_epoch(n, model, px) / (n / rate / 60)
        assert 1.0 <= ratio <= 2.1, (model, px, ratio)
    assert derived_minutes_per_epoch(1000, "resnet50", 64) == pytest.approx(4 * derived_minutes_per_epoch(1000, "resnet50", 32))

    small = {"datasets": {"digits": {"model": "smallcnn", "image_size": 16, "epochs": 100, "scenarios": ["multi"],
                                     "attacks": {"patch": {"ratio": 0.05}}}},
             "defenses": {"none": {"remedy": "none"}, "badloss": {"detector": "badloss", "remedy": "remove"}}}
    f = tmp_path / "g.yaml"
    f.write_text(yaml.safe_dump(small))
    cfg = config.load(f)
    mpe, eager, source = config.epoch_minutes(cfg, "digits")
    assert mpe < 0.01 and eager >= mpe and "derived from 1,437 images" in source
    assert config.estimated_minutes(cfg, "pretrain", "digits") < 5  # not 100 epochs x 1 minute
    assert config.resources(cfg, "pretrain", "digits")["runtime"] < 30
    small["datasets"]["digits"]["minutes_per_epoch"] = 0.5
    f.write_text(yaml.safe_dump(small))
    assert config.epoch_minutes(config.load(f), "digits")[2] == "measured (minutes_per_epoch)"


def test_quiet_traps_are_said_out_loud(tmp_path, capsys, monkeypatch):
    """A mistyped name gets the nearest valid one; an unknown key names itself; a typo in an
    override's defense name says so; short trajectories warn; --version says what runs."""
    from poisongrid.cli import main

    monkeypatch.chdir(tmp_path)
    base = {"datasets": {"digits": {"model": "smallcnn", "epochs": 10, "scenarios": ["multi"],
                                    "attacks": {"patch": {"ratio": 0.05}}}},
            "detectors": {"badloss": {"type": "badloss"}},
            "defenses": {"none": {"remedy": "none"}, "badloss": {"detector": "badloss", "remedy": "remove"}}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(base))

    def err_of(*argv):
        capsys.readouterr()
        code = main(["validate", "--configfile", "g.yaml", *argv])
        return code, capsys.readouterr()

    code, out = err_of("--config", "detectors.badloss.type=badlos")
    assert code == 2 and "(did you mean 'badloss'?)" in out.err
    code, out = err_of("--config", "datasets.digits.epoch=3")
    assert code == 2 and "'datasets.digits.epoch' = 3" in out.err and "(did you mean 'epochs'?)" in out.err
    code, out = err_of("--config", "defenses.badlos.r_reject=0.2")
    assert code == 2 and "'defenses.badlos'" in out.err and "a defense this config defines (did you mean 'badloss'?)" in out.err
    # 30% of 10 epochs: 3 recorded epochs of BaDLoss's trajectories, allowed but warned about.
    code, out = err_of()
    assert code == 0 and "warning: detectors.badloss (badloss) reads a loss per epoch" in out.err and "records 3 epochs" in out.err
    code, out = err_of("--config", "datasets.digits.epochs=20")
    assert code == 0 and "warning" not in out.err
    with pytest.raises(SystemExit):
        main(["--version"])
    import poisongrid

    assert capsys.readouterr().out.strip() == f"poisongrid {poisongrid.__version__} from {Path(poisongrid.__file__).parent}"


def test_shipped_overlays_merge_into_their_preset():
    """configs/overlays/<preset>-*.yaml add cells to <preset>.yaml's grid (same results folder)."""
    root = Path(__file__).parents[1]
    overlays = sorted((root / "configs" / "overlays").glob("*.yaml"))
    assert overlays
    for overlay in overlays:
        base = root / "configs" / (overlay.stem.rsplit("-", 2)[0] + ".yaml")
        assert base.exists(), overlay
        alone, merged = config.load(base, deep=False), config.load([base, overlay], deep=False)
        assert config.results_dir(merged, [base, overlay]) == config.results_dir(alone, [base])
        assert len(config.cells(merged)) > len(config.cells(alone))
