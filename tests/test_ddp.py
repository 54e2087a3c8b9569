"""Data-parallel training (two gloo processes on the CPU, as torchrun would start them) against
single-process training: same global batches, same result."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from poisongrid.training import Rank, _shard, fit, predict

CPU = torch.device("cpu")
# n = 195: with batch 32 the last global batch splits 2/1 over two ranks (uneven shares); with
# batch 97 it holds one example, so one rank runs a weight-0 stand-in.
N, SIZE, CLASSES = 195, 16, 4
SGD = dict(model="unused", epochs=3, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4,
           loss_clamp=100, augment="none")
BN_CNN = dict(model="smallcnn", epochs=4, batch_size=32, lr=3e-3, weight_decay=1e-4, loss_clamp=100, augment="crop_flip")


def _data(n=N, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = np.zeros((n, 3, size, size), dtype=np.uint8)
    for c in range(CLASSES):  # class c lights up colour channel c (all three for the last): crops and flips keep it
        x[y == c, c if c < 3 else slice(None)] = 200
    return np.clip(x.astype(int) + rng.integers(0, 40, x.shape), 0, 255).astype(np.uint8), y


def _bn_free() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, CLASSES))


def _runs(x, y):
    """(name, kwargs) of the runs both ways of training make."""
    return [("sgd", dict(training=SGD, init_model=_bn_free(), record="eval", weights=None)),
            ("sgd_train_record", dict(training=SGD, init_model=_bn_free(), record="train", weights=None)),
            ("weighted", dict(training={**SGD, "batch_size": 97}, init_model=_bn_free(), record="final",
                              weights=np.where(np.arange(len(y)) % 7 == 0, 0.5, 1.0).astype(np.float32))),
            ("bn", dict(training=BN_CNN, init_model=None, record="train", weights=None))]


def _train_all(out_dir: str, rank: int) -> None:
    torch.set_num_threads(1)
    x, y = _data()
    for name, kw in _runs(x, y):
        res = fit(kw["training"], x, y, CLASSES, seed=2, device=CPU, record=kw["record"], weights=kw["weights"],
                  init_model=kw["init_model"])
        torch.save({"losses": torch.from_numpy(res.losses), "train_loss": res.train_loss,
                    "state": res.model.state_dict(), "pred": torch.from_numpy(predict(res.model, x, CPU))},
                   os.path.join(out_dir, f"{name}.rank{rank}.pt"))


class _Killed(Exception):
    pass


def _resumable(out_dir: str, rank: int, tag: str) -> None:
    """BN model with augmentation and a checkpoint; 'killed' (every rank) once epoch 2 is saved."""
    torch.set_num_threads(1)
    x, y = _data()

    said: list[str] = []

    def kill(msg):
        said.append(msg)
        if tag == "killed" and msg.startswith("epoch 2/") and "checkpoint saved" in msg:
            raise _Killed()

    ckpt = os.path.join(out_dir, f"{tag if tag == 'whole' else 'resumed'}.ckpt")
    res = fit(BN_CNN, x, y, CLASSES, seed=4, device=CPU, record="eval", checkpoint=ckpt, fingerprint="f", log=kill)
    torch.save({"losses": torch.from_numpy(res.losses), "state": res.model.state_dict(),
                "resumed": any(m.startswith("resumed from checkpoint") for m in said)},
               os.path.join(out_dir, f"{tag}.rank{rank}.pt"))


def _worker(rank: int, world: int, port: int, out_dir: str, job: str = "all") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    if job == "all":
        _train_all(out_dir, rank)
    else:
        try:
            _resumable(out_dir, rank, job)
        except _Killed:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(d)), nprocs=2, join=True)
    _train_all(str(d), rank=-1)  # the same runs in this one process

    def get(name, rank):
        return torch.load(d / f"{name}.rank{rank}.pt", weights_only=True)

    return get


def test_shards_cover_each_global_batch_exactly_once():
    batch = torch.randperm(100)[:13]
    parts = [_shard(batch, Rank(r, 4, r)) for r in range(4)]
    assert sorted(torch.cat([p for p, real in parts]).tolist()) == sorted(batch.tolist())
    assert [real for _, real in parts] == [4, 3, 3, 3]
    # Fewer examples than ranks: the rank without one runs a weight-0 stand-in.
    p, real = _shard(batch[:1], Rank(1, 2, 1))
    assert real == 0 and p.tolist() == batch[:1].tolist()


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batches(results):
    # BN-free model, SGD, no augmentation: the mean of the ranks' scaled gradients is the full
    # batch's gradient, so training follows the single-process run up to float summation order.
    for name in ("sgd", "sgd_train_record", "weighted"):
        one = results(name, -1)
        for rank in (0, 1):
            two = results(name, rank)
            np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-4, err_msg=name)
            np.testing.assert_allclose(two["losses"].numpy(), one["losses"].numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
            for k, v in one["state"].items():
                np.testing.assert_allclose(two["state"][k].numpy(), v.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"{name} {k}")
    # The model really moved (the match above is not two untrained models).
    assert results("sgd", -1)["train_loss"][-1] < 0.8 * results("sgd", -1)["train_loss"][0]


@pytest.mark.slow
def test_two_processes_record_every_example_once_per_epoch_and_learn(results):
    x, y = _data()
    r0, r1 = results("bn", 0), results("bn", 1)
    losses = r0["losses"].numpy()
    # Every example's training-pass loss, once: a missing one would stay 0, a repeated one doubled
    # (the per-rank losses are summed into one row).
    assert losses.shape == (BN_CNN["epochs"], N) and np.isfinite(losses).all() and (losses > 0).all()
    np.testing.assert_allclose(losses.mean(axis=1), r0["train_loss"], rtol=1e-4)
    # Both ranks end with one and the same model (rank 0's batch-norm statistics broadcast).
    for k, v in r0["state"].items():
        np.testing.assert_array_equal(r1["state"][k].numpy(), v.numpy(), err_msg=k)
    assert r0["train_loss"][-1] < 0.5 * r0["train_loss"][0], r0["train_loss"]
    assert (r0["pred"].numpy() == y).mean() > 0.9


@pytest.mark.slow
def test_torchrun_runs_the_training_stages_of_a_cell_with_two_processes(tmp_path):
    """pretrain and train (CBD: a step_loss with its own critic) through torchrun, two gloo
    processes on the CPU; the other stages in this process. Rank 0 alone writes and logs."""
    import subprocess
    import sys

    import yaml

    from poisongrid import config, paths, trajectories
    from poisongrid.jobs import run_job

    raw = {"device": "cpu", "threads": 1, "cluster": {"gpus_per_job": 1}, "bona_fide": {"n_clean": 60},
           "datasets": {"digits": {"image_size": 16, "model": "smallcnn", "epochs": 3, "batch_size": 64, "lr": 0.003,
                                   "attacks": {"patch": {"ratio": 0.05}}}},
           "defender_models": {"backdoored": {"epochs": 2, "optimizer": "adamw", "lr": 0.001, "record": "eval"}},
           "detectors": {"cbd": {"type": "cbd"}}, "defenses": {"cbd": {"detector": "cbd", "remedy": "cbd"}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(raw))
    cfg = config.validate(raw)
    res = str(tmp_path / "results")
    cell = dict(dataset="digits", scenario="multi", seed=0)

    def torchrun(stage, *flags):
        src = os.path.join(os.path.dirname(__file__), "..", "src")
        env = {**os.environ, "PYTHONPATH": os.path.abspath(src), "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "poisongrid.cli", stage, "--config", str(tmp_path / "grid.yaml"), "--results", res,
                            "--dataset", "digits", "--scenario", "multi", "--seed", "0", *flags],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stderr

    run_job(cfg, "poison", res, **cell)
    run_job(cfg, "bonafide", res, **cell)
    err = torchrun("pretrain", "--model", "backdoored")
    assert err.count("pretrain backdoored (smallcnn): 2 epochs") == 1  # rank 0's log line, once
    out = paths.outputs("pretrain", res, **cell, model="backdoored")
    index, losses, meta = trajectories.read(out["trajectories"], only_accepted=False)
    n = meta["n_examples"]
    assert losses.shape == (n, 2) and sorted(index.tolist()) == list(range(n))
    assert np.isfinite(losses).all() and (losses > 0).all() and meta["processes"] == 2
    assert not os.path.exists(str(out["weights"]) + ".ckpt")
    run_job(cfg, "score", res, **cell, detector="cbd")
    run_job(cfg, "plan", res, **cell, defense="cbd")
    err = torchrun("train", "--defense", "cbd")
    assert err.count("train (cbd):") == 1
    m, _, _ = run_job(cfg, "evaluate", res, **cell, defense="cbd")
    assert m["clean_accuracy"] > 0.3


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_result(tmp_path):
    for job in ("whole", "killed", "resumed"):
        mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), job), nprocs=2, join=True)
    assert not (tmp_path / "killed.rank0.pt").exists()  # it really stopped after epoch 2
    whole, resumed = (torch.load(tmp_path / f"{t}.rank0.pt", weights_only=True) for t in ("whole", "resumed"))
    assert resumed["resumed"] and not whole["resumed"]
    assert torch.load(tmp_path / "resumed.rank1.pt", weights_only=True)["resumed"]  # rank 1 took rank 0's state too
    np.testing.assert_array_equal(resumed["losses"].numpy(), whole["losses"].numpy())
    for k, v in whole["state"].items():
        np.testing.assert_array_equal(resumed["state"][k].numpy(), v.numpy(), err_msg=k)
