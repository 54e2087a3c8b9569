"""End-to-end: a tiny grid through Snakemake, then checks that the numbers are real."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from poisongrid.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "results": "results",
    "device": "cpu",
    "threads": 1,
    "seeds": [0],
    "bona_fide": {"n_clean": 60},
    "detectors": {"badloss": {"type": "badloss", "k": 10, "log_losses": True}},
    "defenses": {"none": {"remedy": "none"}, "badloss": {"detector": "badloss", "remedy": "remove", "r_reject": 0.4}},
    "datasets": {"digits": {
        "image_size": 16, "model": "smallcnn", "epochs": 12, "batch_size": 64, "lr": 0.003,
        "scenarios": ["multi", "single-patch"],
        "attacks": {"patch": {"ratio": 0.05}, "blend_random": {"ratio": 0.04, "alpha": 0.1},
                    "narcissus": {"ratio": 0.02, "learn": {"model": "smallcnn", "epochs": 3, "rounds": 2, "pool_fraction": 0.2}}},
    }},
}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--cores", "2", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


@pytest.mark.slow
def test_tiny_grid_end_to_end(tmp_path):
    cfgfile = tmp_path / "tiny.yaml"
    cfgfile.write_text(yaml.safe_dump(TINY))
    snakemake(tmp_path, "all", "--configfile", str(cfgfile))
    res = tmp_path / "results"
    summary = pd.read_csv(res / "summary.csv")
    assert set(summary["defense"]) == {"none", "badloss"}
    assert set(summary["scenario"]) == {"multi", "single-patch"}
    none = summary[(summary.defense == "none") & (summary.scenario == "multi")]
    # The attacks really install without a defense, and the model really learned the task.
    assert none["asr"].max() > 0.8
    assert none["clean_accuracy"].iloc[0] > 0.8
    m = json.loads((res / "digits/multi/seed0/badloss/metrics.json").read_text())
    assert 0.5 < m["detection"]["auroc"] <= 1.0
    assert m["n_removed"] == round(0.4 * m["n_train"])
    assert m["versions"]["torch"] and m["config"]["seed"] == 0
    tables = (res / "tables.md").read_text()
    assert "digits — multi" in tables and f"{100 * m['clean_accuracy']:.2f}" in tables
    assert list((res / "figures").glob("fig_trajectories_digits_multi_seed0_pretrain.png"))

    # Trajectory file: one row per training example.
    traj = pd.read_parquet(res / "digits/multi/seed0/models/pretrain/trajectories.parquet")
    assert len(traj) == m["n_train"] and len(traj.columns) == 1 + round(0.3 * 12)

    # A deleted cell comes back with `all`.
    (res / "digits/single-patch/seed0/badloss/metrics.json").unlink()
    dry = snakemake(tmp_path, "all", "--configfile", str(cfgfile), "-n")
    assert _job_counts(dry.stdout) == {"evaluate": 1, "aggregate": 1}, dry.stdout[-2000:]
    snakemake(tmp_path, "all", "--configfile", str(cfgfile))

    # A rerun does nothing; a new defense variant reuses the poisoned set, trajectories and scores.
    assert "Nothing to be done" in snakemake(tmp_path, "all", "--configfile", str(cfgfile)).stdout + \
        snakemake(tmp_path, "all", "--configfile", str(cfgfile)).stderr
    cfg2 = {**TINY, "defenses": {**TINY["defenses"], "badloss_r20": {"detector": "badloss", "remedy": "remove", "r_reject": 0.2}}}
    cfgfile2 = tmp_path / "tiny2.yaml"
    cfgfile2.write_text(yaml.safe_dump(cfg2))
    dry = snakemake(tmp_path, "results/digits/multi/seed0/badloss_r20/metrics.json", "--configfile", str(cfgfile2), "-n")
    counts = _job_counts(dry.stdout)
    for rule in ("poison", "pretrain", "score", "trigger"):
        assert rule not in counts, f"{rule} would rerun:\n{dry.stdout[-3000:]}"
    assert counts["train"] == 1
    # The console names each job's cell.
    assert "digits/multi/seed0 badloss_r20: final training" in dry.stdout

    # Which examples the defender knows as clean does not change the training set: another bona fide
    # draw reruns what reads it, never the poisoning, the trigger or a defender model.
    cfg3 = {**TINY, "bona_fide": {"n_clean": 80, "stratified": True}}
    cfgfile3 = tmp_path / "tiny3.yaml"
    cfgfile3.write_text(yaml.safe_dump(cfg3))
    counts = _job_counts(snakemake(tmp_path, "all", "--configfile", str(cfgfile3), "-n").stdout)
    assert counts == {"bonafide": 2, "score": 2, "plan": 4, "train": 2, "evaluate": 4, "aggregate": 1}, counts

    # Two more bona fide sets, each read by its own detector and defense: only their own jobs are
    # added (nothing that exists reruns), and each plan keeps every bona fide example of its set.
    sets = {"u30": {"n_clean": 30, "stratified": False}, "s60": {"n_clean": 60, "stratified": True}}
    cfg4 = {**TINY, "bona_fide_sets": sets,
            "detectors": {**TINY["detectors"], **{f"badloss_{b}": {**TINY["detectors"]["badloss"], "bona_fide": b} for b in sets}},
            "defenses": {**TINY["defenses"], **{f"badloss_{b}": {"detector": f"badloss_{b}", "remedy": "remove", "r_reject": 0.4}
                                                for b in sets}}}
    cfgfile4 = tmp_path / "tiny4.yaml"
    cfgfile4.write_text(yaml.safe_dump(cfg4))
    counts = _job_counts(snakemake(tmp_path, "all", "--configfile", str(cfgfile4), "-n").stdout)
    assert counts == {"bonafide": 4, "score": 4, "plan": 4, "train": 4, "evaluate": 4, "aggregate": 1}, counts
    cell = res / "digits/multi/seed0"
    plans = [f"results/digits/multi/seed0/badloss_{b}/plan.parquet" for b in sets]
    snakemake(tmp_path, *plans, "--configfile", str(cfgfile4))
    from poisongrid import poisoning

    man = poisoning.read_manifest(cell / "poison/manifest.parquet")[0]
    scores = {}
    for b, settings in sets.items():
        man_b = poisoning.read_manifest(cell / "poison/manifest.parquet", cell / f"bona_fide/{b}.parquet")[0]
        bona = man_b["bona_fide"].to_numpy()
        assert bona.sum() == settings["n_clean"] and man_b.loc[bona, "attack"].isna().all()
        plan = pd.read_parquet(cell / f"badloss_{b}/plan.parquet").sort_values("index")
        assert (plan["weight"].to_numpy()[bona] == 1).all() and (plan["weight"] == 0).sum() == round(0.4 * len(man))
        scores[b] = pd.read_parquet(cell / f"scores/badloss_{b}.parquet").sort_values("index")["score"].to_numpy()
    s60 = poisoning.read_manifest(cell / "poison/manifest.parquet", cell / "bona_fide/s60.parquet")[0]
    assert (s60.loc[s60["bona_fide"], "orig_label"].value_counts() == 6).all()  # 10 classes take turns
    assert not (scores["u30"] == scores["s60"]).all()


def _job_counts(out: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table as {rule: count}."""
    counts, inside = {}, False
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("Job stats:"):
            inside = True
        elif inside and parts and parts[0] == "total":
            break
        elif inside and len(parts) == 2 and parts[1].isdigit() and parts[0] != "all":
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.mark.slow
def test_defender_models_are_trained_once_and_remedy_changes_reuse_them(tmp_path):
    """Dry runs: two detectors naming one defender model train it once per cell; the `none` defense
    reuses the attacked model; changing a remedy's parameters plans only plan/train/evaluate."""
    cfg = {**TINY, "seeds": [0], "defender_models": {
        "pretrain": {"r_epoch": 0.3, "augment": "none", "record": "eval"},
        "teacher": {"model": "resnet_s", "epochs": 2, "optimizer": "adam", "weight_decay": 0}},
        "detectors": {"badloss": {"type": "badloss", "k": 10, "log_losses": True}, "badloss_raw": {"type": "badloss", "k": 10},
                      "lfd": {"type": "teacher_loss"}},
        "defenses": {"none": {"remedy": "none"}, "badloss": {"detector": "badloss", "remedy": "remove"},
                     "badloss_raw": {"detector": "badloss_raw", "remedy": "remove"},
                     "lfd": {"detector": "lfd", "remedy": "reweight"},
                     "lfd_remove": {"detector": "lfd", "remedy": "remove", "r_reject": 0.1}}}
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    dry = snakemake(tmp_path, "all", "--configfile", str(cfgfile), "-n")
    counts = _job_counts(dry.stdout)
    n_cells = 2  # multi, single-patch
    # pretrain, teacher, attacked per scenario: the two BaDLoss detectors share one pretraining.
    assert counts["pretrain"] == 3 * n_cells and counts["score"] == 3 * n_cells
    assert counts["plan"] == 5 * n_cells and counts["train"] == 4 * n_cells and counts["evaluate"] == 5 * n_cells
    # A remedy parameter changed on a cell already run plans no poison/pretrain/score job.
    snakemake(tmp_path, "results/digits/single-patch/seed0/lfd/metrics.json", "--configfile", str(cfgfile),
              "--omit-from", "plan")  # everything up to the scores
    cfg["defenses"]["lfd"]["alpha"] = 0.3
    cfgfile.write_text(yaml.safe_dump(cfg))
    dry = snakemake(tmp_path, "results/digits/single-patch/seed0/lfd/metrics.json", "--configfile", str(cfgfile), "-n")
    counts = _job_counts(dry.stdout)
    assert counts == {"plan": 1, "train": 1, "evaluate": 1}, dry.stdout[-3000:]


@pytest.mark.slow
def test_invalid_config_stops_before_any_job(tmp_path):
    bad = {**TINY, "defenses": {"badloss": {"detector": "badloss", "remedy": "remove", "r_reject": 1.5}}}
    cfgfile = tmp_path / "bad.yaml"
    cfgfile.write_text(yaml.safe_dump(bad))
    res = snakemake(tmp_path, "all", "--configfile", str(cfgfile), check=False)
    assert res.returncode != 0
    assert "defenses.badloss.r_reject" in res.stdout + res.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_missing_dataset_stops_the_run_before_any_job_naming_the_path(tmp_path):
    """A wrong data_dir is caught where the grid is checked, not by each poison job; a dry run
    (planning a grid for a cluster that holds the data) still plans it."""
    cfg = {**TINY, "data_dir": str(tmp_path / "nodata"),
           "datasets": {"cifar10": {"model": "smallcnn", "epochs": 1, "scenarios": ["single-patch"],
                                    "attacks": {"patch": {"ratio": 0.01}}}}}
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    res = snakemake(tmp_path, "results/cifar10/single-patch/seed0/poison/manifest.parquet", "--configfile", str(cfgfile),
                    "--retries", "2", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "datasets.cifar10: CIFAR-10" in out and "cifar-10-batches-py" in out and str(tmp_path / "nodata") in out
    assert "Traceback" not in out and not (tmp_path / "results").exists()  # no job started
    dry = snakemake(tmp_path, "results/cifar10/single-patch/seed0/poison/manifest.parquet", "--configfile", str(cfgfile),
                    "-n", check=False)
    assert dry.returncode == 0, dry.stdout + dry.stderr


@pytest.mark.slow
def test_each_config_writes_its_own_results_and_overrides_are_typed(tmp_path):
    """Dry runs: two configs without a `results` key plan under results/<file name>; --config
    KEY=YAML overrides reach nested keys as the right types, also without --configfile."""
    base = {k: v for k, v in TINY.items() if k != "results"}
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(base))
        out = snakemake(tmp_path, "all", "--configfile", str(tmp_path / f"{name}.yaml"), "-n").stdout
        assert f"results/{name}/summary.csv" in out and f"results/{name}/digits/multi/seed0/none/metrics.json" in out
        assert f"results/{'b' if name == 'a' else 'a'}/" not in out
    from poisongrid.cli import snakemake_argv

    # Snakemake refuses a dotted key itself; `poisongrid run` (the same arguments) rewrites it.
    for epochs in ("datasets={digits: {epochs: 5}}", "datasets.digits.epochs=5"):
        args = snakemake_argv(["all", "--configfile", str(tmp_path / "a.yaml"), "-n", "-p", "--config",
                               epochs, "seeds=[0,1]", "cluster={gpus_per_job: 0}", "download=false"])
        dry = snakemake(tmp_path, *args)
        out = dry.stdout
        assert "results/a/digits/multi/seed1/none/metrics.json" in out  # seeds became [0, 1]
        assert '"epochs": 5,' in out and '"epochs": "5"' not in out  # an integer, merged into the dataset
        assert '"model": "smallcnn"' in out  # the rest of the dataset entry is kept
        assert "2> results/a/logs/poison/digits/multi/seed0.log" in out  # each grid keeps its own logs
    # `poisongrid run` is snakemake with that rewriting.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-m", "poisongrid.cli", "run", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
                          "--cores", "1", "all", "-n", "-p", "--configfile", str(tmp_path / "a.yaml"), "--config",
                          "datasets.digits.epochs=7", "seeds=[0]"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and '"epochs": 7,' in run.stdout, run.stderr[-2000:]
    # Without --configfile the paper grid (config.yaml) is the base the overrides merge into.
    dry = snakemake(tmp_path, "all", "-n", "--config", "device=cpu", "cluster={gpus_per_job: 0}")
    assert "results/paper/cifar10/multi/seed0/badloss/metrics.json" in dry.stdout


def test_a_grid_naming_paper_numbers_puts_them_in_its_tables_and_report(tmp_path):
    """paper_numbers reaches the aggregate job and declares the papers' report page; without it
    neither appears."""
    for papers in (None, "badloss-paper"):
        cfg = {k: v for k, v in TINY.items() if k != "results"} | ({"paper_numbers": papers} if papers else {})
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
        out = snakemake(tmp_path, "all", "--configfile", str(tmp_path / "p.yaml"), "-n", "-p").stdout
        agg = next(line for line in out.splitlines() if "poisongrid aggregate" in line)
        assert ("--paper-numbers badloss-paper" in agg) == bool(papers)
        declared = snakemake(tmp_path, "all", "--configfile", str(tmp_path / "p.yaml"), "--summary").stdout
        assert ("tables_papers.html" in declared) == bool(papers)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**TINY, "paper_numbers": "table-9"}))
    bad = snakemake(tmp_path, "all", "--configfile", str(tmp_path / "bad.yaml"), "-n", check=False)
    assert bad.returncode != 0 and "paper_numbers" in bad.stdout + bad.stderr and "lfd-paper" in bad.stdout + bad.stderr


def test_typed_overrides():
    from poisongrid.config import parse_overrides, typed_overrides

    assert typed_overrides({"datasets.digits.epochs": "8", "datasets.digits.lr": "0.01", "seeds": "[0, 1]"}) == \
        {"datasets": {"digits": {"epochs": 8, "lr": 0.01}}, "seeds": [0, 1]}
    assert parse_overrides(["datasets.digits.epochs=8", "cluster={gpus_per_job: 0}", "results=results/x"]) == \
        {"datasets": {"digits": {"epochs": 8}}, "cluster": {"gpus_per_job": 0}, "results": "results/x"}
    for bad in ("epochs", "=8", "datasets..epochs=8"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_overrides([bad])

    got = typed_overrides({"cluster": {"gpus_per_job": "0"}, "seeds": ["0", "1"], "lr": 0.001, "device": "cpu",
                           "datasets": {"digits": {"epochs": "5", "crop_scale": ["0.5", "1.0"]}}, "download": "true"})
    assert got == {"cluster": {"gpus_per_job": 0}, "seeds": [0, 1], "lr": 0.001, "device": "cpu",
                   "datasets": {"digits": {"epochs": 5, "crop_scale": [0.5, 1.0]}}, "download": True}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) + ["../config.yaml"])
def test_every_preset_plans_the_jobs_poisongrid_estimate_counts(tmp_path, preset):
    """The Snakefile's DAG of each shipped config (a dry run) has exactly the jobs `poisongrid
    estimate` counts per stage: every scenario, attack and defense name fits the rules' wildcards."""
    from poisongrid import config as pgc
    from poisongrid.estimate import estimate

    path = (ROOT / "configs" / preset).resolve()
    dry = snakemake(tmp_path, "all", "--configfile", str(path), "-n")
    counts = _job_counts(dry.stdout)
    want: dict = {}
    for r in estimate(pgc.load(path)):
        want[r["stage"]] = want.get(r["stage"], 0) + r["jobs"]
    counts.pop("all", None)
    assert counts == {**want, "aggregate": 1}, dry.stdout[-2000:]


@pytest.mark.slow
def test_a_second_run_on_the_same_results_is_told_the_first_still_runs(tmp_path):
    """While a run holds a grid's results folder, another run there stops before any job, saying
    so (not advising --rerun-incomplete); a marker left by a killed run is replaced; a finished run
    removes its own."""
    import socket
    import time as _time

    cfg = {k: v for k, v in TINY.items()}
    cfg["datasets"] = {"digits": {**TINY["datasets"]["digits"], "scenarios": ["single-patch"],
                                  "attacks": {"patch": {"ratio": 0.05}}}}
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(cfg))
    marker = tmp_path / "results" / ".poisongrid-run"
    marker.parent.mkdir()
    target = "results/digits/single-patch/seed0/poison/manifest.parquet"
    marker.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _time.time()}))
    res = snakemake(tmp_path, target, "--configfile", str(cfgfile), check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and f"another run (process {os.getpid()} on" in out and "rerun-incomplete" not in out
    assert not (tmp_path / target).exists()
    # A dry run or a report may look meanwhile.
    assert snakemake(tmp_path, target, "--configfile", str(cfgfile), "-n", check=False).returncode == 0
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": _time.time()}))
    snakemake(tmp_path, target, "--configfile", str(cfgfile))
    assert (tmp_path / target).exists() and not marker.exists()
