import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from poisongrid import cli, config, paths, status

CFG = {
    "seeds": [0, 1, 2],
    "bona_fide": {"n_clean": 50},
    "detectors": {"badloss": {"type": "badloss", "k": 10}},
    "defenses": {"none": {"remedy": "none"}, "badloss": {"detector": "badloss", "remedy": "remove", "r_reject": 0.4}},
    "datasets": {"digits": {"model": "smallcnn", "epochs": 5, "scenarios": ["single-patch", "single-narcissus"],
                            "attacks": {"patch": {"ratio": 0.05}, "narcissus": {"ratio": 0.04}}}},
}
OLD = time.time() - 3600


def _grid(tmp_path):
    """A hand-made results tree: seed 0 has finished, checkpointed and failed jobs, seed 1 a running
    and an interrupted job, seed 2 nothing."""
    res, logs = str(tmp_path / "results"), str(tmp_path / "logs")

    def write(file, text="x", mtime=None):
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        Path(file).write_text(text)
        if mtime:
            os.utime(file, (mtime, mtime))

    def finish(stage, **w):
        for out in paths.outputs(stage, res, **w).values():
            write(out)
        write(paths.log(stage, logs, **w), "[10:00:00] done\n", OLD)

    def log(stage, text, mtime=None, **w):
        write(paths.log(stage, logs, **w), text, mtime)

    s0p = {"dataset": "digits", "scenario": "single-patch", "seed": 0}
    s0n = {**s0p, "scenario": "single-narcissus"}
    s1p, s1n = {**s0p, "seed": 1}, {**s0n, "seed": 1}
    for seed in (0, 1):
        finish("trigger", dataset="digits", attack="narcissus", seed=seed)
    # seed 0, single-patch: every job of both defenses done.
    finish("poison", **s0p)
    finish("bonafide", **s0p, bona="default")
    for m in ("attacked", "pretrain"):
        finish("pretrain", **s0p, model=m)
    finish("score", **s0p, detector="badloss")
    for d in ("none", "badloss"):
        finish("plan", **s0p, defense=d)
        finish("evaluate", **s0p, defense=d)
    finish("train", **s0p, defense="badloss")
    # seed 0, single-narcissus: the attacked model checkpointed after epoch 3 of 5 (its log idle),
    # the detector's score failed just now.
    finish("poison", **s0n)
    finish("bonafide", **s0n, bona="default")
    finish("pretrain", **s0n, model="pretrain")
    import torch

    ckpt = paths.outputs("pretrain", res, **s0n, model="attacked")["weights"] + ".ckpt"
    Path(ckpt).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 2, "epochs_to_run": 5, "model": {"w": torch.zeros(3)}}, ckpt)
    log("pretrain", "[10:00:00] epoch 3/5 train_loss 0.5 (checkpoint saved)\n", OLD, **s0n, model="attacked")
    log("score", "[10:00:00] scoring\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
        "poisongrid.errors.ArtifactError: trajectories.parquet: file not found\n", None, **s0n, detector="badloss")
    # seed 1, single-patch: poison done, the BaDLoss model training (fresh log), the attacked model's
    # log idle without an error or output; a stale temporary of an old killed write is ignored.
    finish("poison", **s1p)
    finish("bonafide", **s1p, bona="default")
    log("pretrain", "[10:00:00] epoch 2/5: batch 3/9, 120 img/s\n", None, **s1p, model="pretrain")
    log("pretrain", "[10:00:00] epoch 1/5 train_loss 0.9\n", OLD, **s1p, model="attacked")
    plan = paths.outputs("plan", res, **s1p, defense="none")["out"]
    write(os.path.join(os.path.dirname(plan), f".{os.path.basename(plan)}.abc123.tmp"), "", OLD)
    # seed 1, single-narcissus: only the shared trigger done; poison writing (a fresh temporary, no log).
    man = paths.outputs("poison", res, **s1n)["manifest"]
    write(os.path.join(os.path.dirname(man), f".{os.path.basename(man)}.q1w2e3.tmp"), "")
    return res, logs


def _load(tmp_path):
    f = tmp_path / "grid.yaml"
    f.write_text(yaml.safe_dump(CFG))
    return f, config.load(f, deep=False)


def test_jobs_and_cells_are_classified(tmp_path):
    f, cfg = _load(tmp_path)
    res, logs = _grid(tmp_path)
    jobs, cells = status.collect(cfg, res, logs)
    by = {j.name: j for j in jobs}
    assert len(jobs) == 3 * 21 + 1 and jobs[-1].stage == "aggregate"
    assert by["train/digits/single-patch/seed0/badloss"].state == "done"
    ck = by["pretrain/digits/single-narcissus/seed0/attacked"]
    assert (ck.state, ck.detail) == ("checkpointed", "checkpoint after epoch 3/5")
    failed = by["score/digits/single-narcissus/seed0/badloss"]
    assert failed.state == "failed" and failed.detail.startswith(failed.log) and "ArtifactError" in failed.detail
    assert failed.log == paths.log("score", logs, dataset="digits", scenario="single-narcissus", seed=0, detector="badloss")
    run = by["pretrain/digits/single-patch/seed1/pretrain"]
    assert run.state == "running" and "batch 3/9" in run.detail
    assert by["poison/digits/single-narcissus/seed1"].state == "running"  # a fresh temporary output
    assert by["pretrain/digits/single-patch/seed1/attacked"].state == "interrupted"
    assert by["plan/digits/single-patch/seed1/none"].state == "not started"  # its temporary is stale
    assert by["poison/digits/single-patch/seed2"].state == "not started"

    cell = {c.name: c for c in cells}
    assert [(cell[n].state, cell[n].at.label) for n in ("digits/single-patch/seed0/none", "digits/single-patch/seed0/badloss",
                                                        "digits/single-narcissus/seed0/none", "digits/single-narcissus/seed0/badloss")] == [
        ("done", "evaluate"), ("done", "evaluate"), ("checkpointed", "pretrain attacked"), ("failed", "score badloss")]
    assert cell["digits/single-patch/seed1/badloss"].state == "running"
    assert cell["digits/single-patch/seed1/none"].state == "interrupted"
    assert (cell["digits/single-narcissus/seed1/none"].state, cell["digits/single-narcissus/seed1/none"].at.label) == \
        ("running", "poison")
    assert {c.state for n, c in cell.items() if "seed2" in n} == {"not started"}
    assert status.totals(cells, status.CELL_STATES) == \
        "12: done 2, running 3, checkpointed 1, failed 1, interrupted 1, pending 0, not started 4"


def test_pending_cell_and_aggregate(tmp_path):
    _, cfg = _load(tmp_path)
    res, logs = str(tmp_path / "results"), str(tmp_path / "logs")
    for out in paths.outputs("trigger", res, dataset="digits", attack="narcissus", seed=2).values():
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("x")
    Path(paths.path("summary", res)).write_text("x")
    jobs, cells = status.collect(cfg, res, logs)
    c = next(c for c in cells if c.name == "digits/single-narcissus/seed2/none")
    assert (c.state, c.at.label) == ("pending", "poison")
    assert status.format_cells([c]) == ["digits/single-narcissus/seed2/none  pending       next: poison (1/6 jobs done)"]
    assert jobs[-1].state == "done"


def test_cli_prints_cells_jobs_and_totals(tmp_path, capsys):
    f, _ = _load(tmp_path)
    res, logs = _grid(tmp_path)
    assert cli.main(["status", "--configfile", str(f), "--results", res, "--logs", logs]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [
        "cells 12: done 2, running 3, checkpointed 1, failed 1, interrupted 1, pending 0, not started 4",
        "jobs 64: done 17, running 2, checkpointed 1, failed 1, interrupted 1, not started 42"]
    line = next(x for x in out if x.startswith("digits/single-narcissus/seed0/badloss "))
    assert "failed" in line and f"score badloss: {logs}/score/digits/single-narcissus/seed0/badloss.log: " in line
    assert any(x.startswith("digits/single-narcissus/seed0/none ") and "checkpoint after epoch 3/5" in x for x in out)
    assert len(out) == 12 + 3

    assert cli.main(["status", "--configfile", str(f), "--results", res, "--logs", logs, "--jobs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 64 + 3 and out[-1].startswith("jobs 64:")
    assert any(x.startswith("pretrain/digits/single-narcissus/seed0/attacked ") and "checkpointed" in x for x in out)


def test_status_does_not_import_torch_without_checkpoints(tmp_path):
    f, _ = _load(tmp_path)
    code = ("import sys; from poisongrid import cli; "
            f"assert cli.main(['status', '--configfile', {str(f)!r}, '--results', {str(tmp_path / 'r')!r}]) == 0; "
            "assert 'torch' not in sys.modules")
    src = str(Path(status.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "jobs 64: done 0, running 0, checkpointed 0, failed 0, interrupted 0, not started 64" in p.stdout


def test_each_bona_fide_set_is_a_job_of_the_cells_reading_it(tmp_path):
    """A second bona fide set read by one detector: one more bonafide job per (scenario, seed), in
    the cells of the defense using it only, with its own log; finished, it counts as done."""
    cfg = config.validate({**CFG, "bona_fide_sets": {"n20": {"n_clean": 20}},
                           "detectors": {**CFG["detectors"], "badloss_n20": {"type": "badloss", "k": 10, "bona_fide": "n20"}},
                           "defenses": {**CFG["defenses"], "badloss_n20": {"detector": "badloss_n20", "remedy": "remove"}}},
                          deep=False)
    res, logs = str(tmp_path / "results"), str(tmp_path / "logs")
    w = {"dataset": "digits", "scenario": "single-patch", "seed": 0}
    out = paths.outputs("bonafide", res, **w, bona="n20")["out"]
    assert out == f"{res}/digits/single-patch/seed0/bona_fide/n20.parquet"
    Path(out).parent.mkdir(parents=True)
    Path(out).write_text("x")
    jobs, cells = status.collect(cfg, res, logs)
    bona = {j.name: j for j in jobs if j.stage == "bonafide"}
    assert len(bona) == 2 * 3 * 2  # scenarios x seeds x sets
    job = bona["bonafide/digits/single-patch/seed0/n20"]
    assert job.state == "done" and job.label == "bonafide n20"
    assert job.log == paths.log("bonafide", logs, **w, bona="n20")
    cell = {c.name: c for c in cells}
    reads = {c: sorted(j.wildcards["bona"] for j in cell[c].jobs if j.stage == "bonafide")
             for c in ("digits/single-patch/seed0/none", "digits/single-patch/seed0/badloss_n20")}
    assert reads == {"digits/single-patch/seed0/none": ["default"], "digits/single-patch/seed0/badloss_n20": ["n20"]}


def _marker(job_outputs, pid, host=None):
    import json
    import socket

    from poisongrid import liveness

    m = liveness.marker(job_outputs)
    Path(m).parent.mkdir(parents=True, exist_ok=True)
    Path(m).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": time.time()}))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_job_is_not_called_running_however_fresh_its_log(tmp_path):
    _, cfg = _load(tmp_path)
    res, logs = str(tmp_path / "results"), str(tmp_path / "logs")
    w = {"dataset": "digits", "scenario": "single-patch", "seed": 0}
    outs = list(paths.outputs("pretrain", res, **w, model="attacked").values())
    log = paths.log("pretrain", logs, **w, model="attacked")
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    Path(log).write_text("[10:00:00] epoch 2/5: batch 3/9\n")  # written a moment ago: looks alive
    _marker(outs, _dead_pid())
    by = {j.name: j for j in status.collect(cfg, res, logs)[0]}
    assert by["pretrain/digits/single-patch/seed0/attacked"].state == "interrupted"
    # The same marker naming a live process (this one): running, even with a log idle for an hour.
    os.utime(log, (OLD, OLD))
    _marker(outs, os.getpid())
    by = {j.name: j for j in status.collect(cfg, res, logs)[0]}
    assert by["pretrain/digits/single-patch/seed0/attacked"].state == "running"
    # Another host's marker cannot be checked here: the log's age decides (idle: not running).
    _marker(outs, os.getpid(), host="some-other-node")
    by = {j.name: j for j in status.collect(cfg, res, logs)[0]}
    assert by["pretrain/digits/single-patch/seed0/attacked"].state == "interrupted"


def test_a_final_training_checkpoint_is_seen(tmp_path):
    import torch

    _, cfg = _load(tmp_path)
    res, logs = str(tmp_path / "results"), str(tmp_path / "logs")
    w = {"dataset": "digits", "scenario": "single-patch", "seed": 0}
    model = paths.outputs("train", res, **w, defense="badloss")["out"]
    Path(model).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "epochs_to_run": 5, "model": {"w": torch.zeros(1)}}, model + ".ckpt.train")
    log = paths.log("train", logs, **w, defense="badloss")
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    Path(log).write_text("[10:00:00] epoch 4/5 train_loss 0.4 (checkpoint saved)\n")
    os.utime(log, (OLD, OLD))
    by = {j.name: j for j in status.collect(cfg, res, logs)[0]}
    job = by["train/digits/single-patch/seed0/badloss"]
    assert (job.state, job.detail) == ("checkpointed", "checkpoint after epoch 4/5")


def test_a_stage_keeps_its_marker_while_it_runs_and_removes_it(tmp_path):
    from poisongrid import liveness

    out = str(tmp_path / "x" / "model.pt")
    with liveness.running([out]):
        assert liveness.alive(out + liveness.SUFFIX) is True
    assert not os.path.exists(out + liveness.SUFFIX)
    try:
        with liveness.running([out]):
            raise KeyError("the stage failed")
    except KeyError:
        pass
    assert not os.path.exists(out + liveness.SUFFIX)


def test_each_grid_reads_its_own_logs(tmp_path):
    """Logs live in the grid's results folder: another grid's interrupted aggregate is not this one's."""
    _, cfg = _load(tmp_path)
    a, b = str(tmp_path / "results" / "a"), str(tmp_path / "results" / "b")
    other = paths.log("aggregate", paths.logs_dir(b))
    Path(other).parent.mkdir(parents=True, exist_ok=True)
    Path(other).write_text("[10:00:00] aggregating\n")
    os.utime(other, (OLD, OLD))
    assert status.collect(cfg, b)[0][-1].state == "interrupted"
    assert status.collect(cfg, a)[0][-1].state == "not started"
    assert paths.logs_dir(a) == f"{a}/logs"


def test_watch_prints_progress_with_an_eta(tmp_path):
    _, cfg = _load(tmp_path)
    res = str(tmp_path / "results")
    jobs = status.collect(cfg, res)[0]
    progress = status.Progress()
    first = progress.line(jobs, now=1000.0)
    assert f"jobs done 0/{len(jobs)} (0%)" in first and "ETA: once a job finishes" in first
    for j in jobs[:10]:  # ten jobs finish in the next 5 minutes: 2 per minute
        j.state = "done"
    later = progress.line(jobs, now=1300.0)
    left = len(jobs) - 10
    assert f"jobs done 10/{len(jobs)}" in later and "2 jobs/min" in later
    assert f"ETA {left // 2 // 60} h {left // 2 % 60} min" in later or f"ETA {left // 2} min" in later


def test_status_watch_through_the_cli(tmp_path, capsys, monkeypatch):
    f, _ = _load(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["status", "--configfile", str(f), "--results", "results", "--watch", "0.01", "--looks", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum("jobs done 0/" in line for line in out) == 2 and out[-1].endswith("ETA: once a job finishes while watching")
