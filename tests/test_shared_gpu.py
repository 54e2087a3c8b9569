"""cluster.jobs_per_gpu: GPU-stage jobs grouped into one scheduler job give the same artifacts.

Local execution ignores Snakemake groups, so the grouped run goes through a cluster executor
(snakemake-executor-plugin-cluster-generic, a test dependency) whose "submission" starts the job
script in the background: the same path as an sbatch job, in which one Snakemake process runs
every job of the group side by side."""
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from test_workflow import TINY, snakemake

CELL = "results/digits/multi/seed0"
GPU_OUTPUTS = [f"{CELL}/models/pretrain/trajectories.parquet", f"{CELL}/models/attacked/model.pt"]


def tiny(jobs_per_gpu: int) -> dict:
    # One cell; its two defender models (BaDLoss pretraining, the attacked model) are two pretrain jobs.
    ds = {**TINY["datasets"]["digits"], "epochs": 4, "scenarios": ["multi"],
          "attacks": {"patch": {"ratio": 0.05}, "blend_random": {"ratio": 0.04, "alpha": 0.1}}}
    return {**TINY, "datasets": {"digits": ds},
            "cluster": {"gpus_per_job": 1, "gpu_mem_mb": 700, "jobs_per_gpu": jobs_per_gpu}}


def write(tmp_path: Path, name: str, cfg: dict) -> Path:
    (tmp_path / name).mkdir()
    f = tmp_path / name / "config.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def groups(dry_out: str) -> list[tuple[str, list[str]]]:
    """The dry run's group jobs: (group, the rules of its jobs)."""
    out = []
    for line in dry_out.splitlines():
        if m := re.search(r"Group job (\S+) \(", line):
            out.append((m.group(1), []))
        elif out and (m := re.match(r"    Job \d+: .*?: (train defender model|final training)", line)):
            out[-1][1].append(m.group(1))
    return out


@pytest.mark.slow
def test_dry_run_groups_gpu_rules_only_when_jobs_share_a_gpu(tmp_path):
    two_seeds = {**tiny(2), "seeds": [0, 1]}
    dry = snakemake(tmp_path, "all", "-n", "--configfile", str(write(tmp_path, "shared", two_seeds))).stdout
    got = sorted((g, len(jobs)) for g, jobs in groups(dry))
    # 2 cells x 2 defender models = 4 pretrain jobs in 2 groups; 2 final trainings (badloss; `none`
    # reuses the attacked model) in 1 group. CPU rules stay ungrouped.
    assert got == [("gpu_pretrain", 2), ("gpu_pretrain", 2), ("gpu_train", 2)], dry[-3000:]
    # The command line's --group-components wins over the config.
    dry = snakemake(tmp_path, "all", "-n", "--configfile", str(tmp_path / "shared/config.yaml"),
                    "--group-components", "gpu_pretrain=4").stdout
    assert sorted((g, len(j)) for g, j in groups(dry)) == [("gpu_pretrain", 4), ("gpu_train", 2)]
    dry = snakemake(tmp_path, "all", "-n", "--configfile", str(write(tmp_path, "one", {**two_seeds, "cluster": {
        "gpus_per_job": 1, "jobs_per_gpu": 1}}))).stdout
    assert "Group job" not in dry and "pretrain" in dry


@pytest.mark.slow
def test_jobs_sharing_a_gpu_write_the_same_artifacts_as_one_job_per_gpu(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_cluster_generic")
    shared = write(tmp_path, "shared", tiny(2))
    d = tmp_path / "shared"
    # The poisoned set once, locally; both runs start from it (with Snakemake's records of it).
    snakemake(d, f"{CELL}/poison/manifest.parquet", "--configfile", str(shared))
    shutil.copytree(d, tmp_path / "one", dirs_exist_ok=True)
    ref = tmp_path / "one/config.yaml"
    ref.write_text(yaml.safe_dump(tiny(1)))
    one = snakemake(tmp_path / "one", *GPU_OUTPUTS, "--configfile", str(ref))
    log = one.stdout + one.stderr
    assert log.count("train defender model") == 2 and "poison the training set" not in log, log[-3000:]

    # The two pretrain jobs as one group job through the executor.
    submit = ("sh -c 'echo \"{resources.gres} {resources.mem_mb} {resources.runtime}\" >> submitted.txt; "
              "sh \"$0\" >> jobs.out 2>&1 & echo $!'")
    res = snakemake(d, *GPU_OUTPUTS, "--configfile", str(shared), "--jobs", "2", "--executor", "cluster-generic",
                    "--cluster-generic-submit-cmd", submit, "--latency-wait", "5", "--seconds-between-status-checks", "1")
    out = res.stdout + res.stderr
    assert out.count("Submitted group job") == 1 and "Submitted job" not in out, out[-3000:]
    # One GPU for the group, the memory of its 2 jobs side by side, the runtime of the longer one.
    gres, mem, runtime = (d / "submitted.txt").read_text().split()
    assert (gres, int(mem)) == ("gpu:1", 2 * 700) and int(runtime) >= 10

    a = pd.read_parquet(tmp_path / "one" / GPU_OUTPUTS[0])
    b = pd.read_parquet(d / GPU_OUTPUTS[0])
    assert a.shape[1] > 1 and a.equals(b)
    ma, mb = (torch.load(r / GPU_OUTPUTS[1], map_location="cpu", weights_only=True) for r in (tmp_path / "one", d))
    sa, sb = ma["state_dict"], mb["state_dict"]
    assert sa and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
