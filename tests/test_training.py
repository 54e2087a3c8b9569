import numpy as np
import torch
import torch.nn.functional as F

from poisongrid.training import AUGMENTS, fit, per_example_loss, predict

CPU = torch.device("cpu")
TR = dict(model="smallcnn", epochs=4, batch_size=32, lr=3e-3, weight_decay=1e-4, loss_clamp=100, augment="none")


def _data(n=160, size=16, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = np.zeros((n, 3, size, size), dtype=np.uint8)
    for c in range(4):  # a learnable signal: class c lights up quadrant c
        r, q = divmod(c, 2)
        x[y == c, :, r * size // 2:(r + 1) * size // 2, q * size // 2:(q + 1) * size // 2] = 200
    x = np.clip(x.astype(int) + rng.integers(0, 40, x.shape), 0, 255).astype(np.uint8)
    return x, y


def test_fit_records_one_row_per_example_and_learns():
    x, y = _data()
    res = fit(TR, x, y, 4, seed=0, device=CPU, record="eval")
    assert res.losses.shape == (4, len(y)) and res.losses.dtype == np.float32
    assert res.train_loss[-1] < res.train_loss[0]
    assert (predict(res.model, x, CPU) == y).mean() > 0.9
    # The recorded losses are the unclamped eval-mode cross-entropy of the final model.
    ref = F.cross_entropy(res.model.eval()(torch.from_numpy(x).float() / 255), torch.from_numpy(y), reduction="none")
    np.testing.assert_allclose(res.losses[-1], ref.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(per_example_loss(res.model, torch.from_numpy(x), torch.from_numpy(y), CPU, batch_size=7).numpy(),
                               res.losses[-1], rtol=1e-4, atol=1e-5)


def test_fit_is_deterministic_on_cpu_and_early_stop_keeps_schedule():
    x, y = _data()
    tr = {**TR, "augment": "crop_flip"}
    a = fit(tr, x, y, 4, seed=3, device=CPU, record="eval")
    b = fit(tr, x, y, 4, seed=3, device=CPU, record="eval")
    np.testing.assert_array_equal(a.losses, b.losses)
    c = fit(tr, x, y, 4, seed=3, device=CPU, record="eval", epochs_to_run=2)
    assert c.epochs_run == 2
    np.testing.assert_array_equal(c.losses, a.losses[:2])  # same schedule, stopped early


def test_train_mode_recording_scatters_by_index():
    x, y = _data()
    res = fit(TR, x, y, 4, seed=0, device=CPU, record="train", epochs_to_run=1)
    assert res.losses.shape == (1, len(y)) and np.isfinite(res.losses).all() and (res.losses > 0).all()


def test_batch_augmentations_keep_uint8_and_content():
    x, _ = _data(n=8, size=32)
    t = torch.from_numpy(x)
    gen = torch.Generator().manual_seed(0)
    for name in ("none", "crop_flip", "resized_crop_flip"):
        out = AUGMENTS.get(name)(t, gen, {"crop_scale": (0.5, 1.0)})
        assert out.dtype == torch.uint8 and out.shape == t.shape
    # crop_flip: each output is a 32x32 window of the reflect-padded image, maybe mirrored.
    out = AUGMENTS.get("crop_flip")(t, torch.Generator().manual_seed(1), {}).numpy()
    padded = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    for i in range(len(x)):
        found = any(np.array_equal(cand, out[i]) for oy in range(9) for ox in range(9)
                    for cand in (padded[i, :, oy:oy + 32, ox:ox + 32], padded[i, :, oy:oy + 32, ox:ox + 32][:, :, ::-1]))
        assert found


class _Killed(Exception):
    pass


def _kill_after(epoch_no):
    def log(msg):
        if msg.startswith(f"epoch {epoch_no}/") and "checkpoint saved" in msg:
            raise _Killed()

    return log


def _kill_then_rerun(tr, x, y, ckpt, first_fingerprint, second_fingerprint):
    """Run until the checkpoint of epoch 2 is written, 'kill' it, then run again; return (result, log)."""
    try:
        fit(tr, x, y, 4, seed=1, device=CPU, record="eval", checkpoint=ckpt, fingerprint=first_fingerprint, log=_kill_after(2))
    except _Killed:
        pass
    msgs = []
    res = fit(tr, x, y, 4, seed=1, device=CPU, record="eval", checkpoint=ckpt, fingerprint=second_fingerprint, log=msgs.append)
    return res, msgs


def test_killed_run_resumes_bit_equal(tmp_path):
    x, y = _data()
    tr = {**TR, "augment": "crop_flip", "epochs": 5}
    ref = fit(tr, x, y, 4, seed=1, device=CPU, record="eval")
    res, msgs = _kill_then_rerun(tr, x, y, str(tmp_path / "run.ckpt"), "a", "a")
    assert any("resumed" in m and "continuing at epoch 3/5" in m for m in msgs)
    np.testing.assert_array_equal(res.losses, ref.losses)
    assert res.train_loss == ref.train_loss
    for a, b in zip(res.model.state_dict().values(), ref.model.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_from_other_inputs_is_ignored(tmp_path):
    x, y = _data()
    ckpt = str(tmp_path / "run.ckpt")
    res, msgs = _kill_then_rerun(TR, x, y, ckpt, "old", "new")
    assert any("other inputs" in m for m in msgs) and not any("resumed" in m for m in msgs)
    np.testing.assert_array_equal(res.losses, fit(TR, x, y, 4, seed=1, device=CPU, record="eval").losses)
    # A truncated checkpoint is not trusted either.
    open(ckpt, "wb").write(b"\x80\x02junk")
    msgs = []
    fit(TR, x, y, 4, seed=1, device=CPU, record="eval", epochs_to_run=1, checkpoint=ckpt, fingerprint="new", log=msgs.append)
    assert any("unreadable" in m for m in msgs)


def test_no_gpu_under_slurm_is_a_config_error(monkeypatch):
    import pytest

    from poisongrid.errors import ConfigError
    from poisongrid.training import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    with pytest.raises(ConfigError, match="SLURM job 1234.*device: cpu"):
        resolve_device("auto")
    assert resolve_device("cpu").type == "cpu"  # deliberate CPU runs stay possible
    monkeypatch.delenv("SLURM_JOB_ID")
    assert resolve_device("auto").type == "cpu"


def _params(model):
    return [p.detach().clone() for p in model.state_dict().values()]


def test_all_ones_weights_take_exactly_the_plain_step():
    x, y = _data()
    plain = fit(TR, x, y, 4, seed=5, device=CPU, epochs_to_run=2)
    ones = fit(TR, x, y, 4, seed=5, device=CPU, epochs_to_run=2, weights=np.ones(len(y)), ascent_clamp=10.0)
    assert plain.train_loss == ones.train_loss
    for a, b in zip(_params(plain.model), _params(ones.model)):
        assert torch.equal(a, b)


def test_weighted_step_is_the_weighted_mean_and_ascent_is_clamped():
    """One step on one batch equals a hand-built step on mean(w * clamp(loss)); ascent examples'
    loss is clamped at ascent_clamp, so once past it their gradient is zero."""
    x, y = _data(n=32)
    w = np.linspace(-0.5, 1.0, 32).astype(np.float32)
    w[w == 0] = 0.1
    tr = {**TR, "epochs": 1}
    res = fit(tr, x, y, 4, seed=2, device=CPU, weights=w, ascent_clamp=0.5)
    # The same step by hand: same init (seed), same single full batch (order is irrelevant to a mean).
    from poisongrid.models import build_model

    torch.manual_seed(2)
    model = build_model("smallcnn", 4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=TR["lr"], weight_decay=TR["weight_decay"])
    model.train()
    per = F.cross_entropy(model(torch.from_numpy(x).float() / 255), torch.from_numpy(y), reduction="none")
    wt = torch.from_numpy(w)
    capped = torch.where(wt < 0, per.clamp(max=0.5), per.clamp(max=100))
    (capped * wt).mean().backward()
    opt.step()
    for a, b in zip(res.model.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_weights_must_be_nonzero_and_ascent_needs_a_clamp():
    import pytest

    x, y = _data(n=32)
    with pytest.raises(ValueError, match="nonzero"):
        fit(TR, x, y, 4, seed=0, device=CPU, weights=np.zeros(32))
    with pytest.raises(ValueError, match="ascent_clamp"):
        fit(TR, x, y, 4, seed=0, device=CPU, weights=-np.ones(32))


def test_final_record_is_one_eval_pass_after_the_last_epoch():
    x, y = _data()
    res = fit(TR, x, y, 4, seed=0, device=CPU, record="final", epochs_to_run=2)
    ev = fit(TR, x, y, 4, seed=0, device=CPU, record="eval", epochs_to_run=2)
    assert res.losses.shape == (1, len(y))
    np.testing.assert_array_equal(res.losses[0], ev.losses[-1])


def test_optimizers_and_zero_padded_crop():
    x, y = _data()
    for opt in ("adam", "sgd"):
        res = fit({**TR, "optimizer": opt, "lr": 1e-3 if opt == "adam" else 0.05}, x, y, 4, seed=0, device=CPU)
        assert res.train_loss[-1] < res.train_loss[0]
    gen = torch.Generator().manual_seed(0)
    img = torch.full((64, 3, 8, 8), 200, dtype=torch.uint8)
    out = AUGMENTS.get("crop_flip_zero")(img, gen, {})
    # Zero padding shows as black borders on shifted crops; reflect padding never does.
    assert (out == 0).any() and out.max() == 200
    assert not (AUGMENTS.get("crop_flip")(img, gen, {}) == 0).any()


def test_penultimate_features_are_the_last_linear_input():
    from poisongrid.training import penultimate_features

    x, y = _data(n=40)
    res = fit(TR, x, y, 4, seed=0, device=CPU, epochs_to_run=1)
    f = penultimate_features(res.model, x, CPU, batch_size=16)
    assert f.shape == (40, 64) and f.dtype == np.float32
    # The features map to the model's logits through its last layer.
    last = res.model[-1]
    logits = res.model.eval()(torch.from_numpy(x).float() / 255).detach()
    torch.testing.assert_close(last(torch.from_numpy(f)), logits, rtol=1e-4, atol=1e-5)


def test_progress_lines_and_epoch_rate_and_eta():
    import re

    x, y = _data()
    msgs = []
    fit(TR, x, y, 4, seed=0, device=CPU, epochs_to_run=3, log=msgs.append, progress_every=0)
    epochs = [m for m in msgs if re.match(r"epoch \d+/3 train_loss", m)]
    batches = [m for m in msgs if re.match(r"epoch \d+/3: batch \d+/5, \d+ img/s$", m)]
    assert len(epochs) == 3 and all(re.search(r" \d+ img/s [\d.hms]+ ETA [\d.hms]+$", m) for m in epochs)
    assert epochs[-1].endswith("ETA 0.0s")
    assert len(batches) == 15 and batches[0].startswith("epoch 1/3: batch 1/5") and batches[-1].startswith("epoch 3/3: batch 5/5")
    # The default interval (60 s) leaves a short run with epoch lines only.
    quiet = []
    fit(TR, x, y, 4, seed=0, device=CPU, epochs_to_run=1, log=quiet.append)
    assert len(quiet) == 1 and "img/s" in quiet[0] and "ETA" in quiet[0]


def test_format_duration():
    from poisongrid.training import format_duration

    assert [format_duration(s) for s in (4.24, 192, 3600 + 5 * 60 + 10, float("nan"))] == ["4.2s", "3m12s", "1h05m", "?"]


def test_a_full_disk_during_a_checkpoint_names_the_path_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    import pytest

    from poisongrid import training

    x, y = _data()
    ckpt = str(tmp_path / "run.ckpt")
    real_save, calls = torch.save, []

    def full_disk(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the second epoch's checkpoint: the disk fills mid-write
            open(f, "wb").write(b"\x80partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(training.torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        fit(TR, x, y, 4, seed=1, device=CPU, record="eval", checkpoint=ckpt, fingerprint="f")
    assert e.value.errno == errno.ENOSPC and e.value.filename == ckpt and "No space left" in str(e.value)
    assert not [p for p in tmp_path.iterdir() if p.name != "run.ckpt"]  # no temporary file left behind
    monkeypatch.setattr(training.torch, "save", real_save)
    msgs = []
    res = fit(TR, x, y, 4, seed=1, device=CPU, record="eval", checkpoint=ckpt, fingerprint="f", log=msgs.append)
    assert any("resumed" in m and "continuing at epoch 2/4" in m for m in msgs)  # epoch 1's checkpoint was usable
    np.testing.assert_array_equal(res.losses, fit(TR, x, y, 4, seed=1, device=CPU, record="eval").losses)


def test_an_epochs_augmentation_draws_equal_drawing_before_each_batch():
    """Drawn at the epoch's start (one copy to the device), sliced by batch: the same numbers, and
    so the same augmented batches, as drawing before each batch from the same generator."""
    from poisongrid.training import _epoch_draws

    x, _ = _data(n=70, size=16)
    t = torch.from_numpy(x)
    sizes = [32, 32, 6]
    spec = {"crop_scale": (0.3, 1.0)}
    for name in ("none", "crop_flip", "crop_flip_zero", "resized_crop_flip"):
        aug = AUGMENTS.get(name)
        draws = _epoch_draws(aug, sizes, torch.Generator().manual_seed(5), spec, CPU)
        gen = torch.Generator().manual_seed(5)
        start = 0
        for size in sizes:
            batch = t[start:start + size]
            one_by_one = aug(batch, gen, spec)
            sliced = aug.apply(batch, tuple(d[start:start + size] for d in draws), spec)
            assert torch.equal(one_by_one, sliced), name
            start += size
        assert all(len(d) == sum(sizes) for d in draws)
        if name != "none":
            assert not torch.equal(aug.apply(t[:32], tuple(d[:32] for d in draws), spec),
                                   aug.apply(t[:32], tuple(d[32:64] for d in draws), spec))


def test_cuda_graphs_setting_reaches_the_training_runtime():
    """`cuda_graphs: false` reaches every GPU stage's runtime and the loop; the default leaves the
    stages' settings (and so Snakemake's params and cached results) as they were."""
    from poisongrid import config, training

    base = {"datasets": {"digits": {"model": "smallcnn", "epochs": 2, "attacks": {"patch": {"ratio": 0.05}}}},
            "defenses": {"none": {"remedy": "none"}}}
    on = config.validate(base, deep=False)
    off = config.validate({**base, "cuda_graphs": False}, deep=False)
    assert config.runtime_spec(on) == {"device": on["device"], "threads": on["threads"]}
    assert config.runtime_spec(off)["cuda_graphs"] is False
    try:
        training.setup_runtime(config.runtime_spec(off))
        assert training._RUNTIME["cuda_graphs"] is False
        training.setup_runtime(config.runtime_spec(on))
        assert training._RUNTIME["cuda_graphs"] is True
    finally:
        training._RUNTIME["cuda_graphs"] = True
        torch.set_num_threads(1)


def test_cpu_training_keeps_plain_float_learning_rates(tmp_path):
    """Learning rates as device tensors are for CUDA graphs: on the CPU the checkpointed optimiser
    and schedule hold plain numbers, and no fused or capturable optimiser is asked for."""
    x, y = _data(n=64)
    ckpt = str(tmp_path / "c.ckpt")
    res = fit({**TR, "epochs": 2}, x, y, 4, seed=0, device=CPU, checkpoint=ckpt, fingerprint="f")
    state = torch.load(ckpt, weights_only=True)
    group = state["opt"]["param_groups"][0]
    assert not res.graphed
    assert isinstance(group["lr"], float) and not group.get("fused") and not group.get("capturable")
    assert all(isinstance(v, float) for v in state["sched"]["base_lrs"] + state["sched"]["_last_lr"])


def test_cpu_channels_last_is_deterministic_and_only_where_asked():
    from poisongrid.training import channels_last, fit, predict, setup_runtime

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (96, 3, 16, 16), dtype=np.uint8), rng.integers(0, 3, 96)
    spec = {"model": "smallcnn", "epochs": 2, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.0, "augment": "crop_flip"}
    cpu = torch.device("cpu")
    try:
        setup_runtime({"device": "cpu", "threads": 1, "cpu_channels_last": True})
        assert channels_last(cpu)
        a, b = (fit(spec, x, y, 3, seed=0, device=cpu) for _ in range(2))
        assert a.train_loss == b.train_loss
        conv = next(m for m in a.model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        np.testing.assert_array_equal(predict(a.model, x, cpu), predict(b.model, x, cpu))
    finally:
        setup_runtime({"device": "cpu", "threads": 1})
    assert not channels_last(cpu)
    c = fit(spec, x, y, 3, seed=0, device=cpu)
    # Same recipe, other memory format: the same training up to rounding.
    np.testing.assert_allclose(c.train_loss, a.train_loss, rtol=1e-3)


def test_bn_recalibration_leaves_the_batch_average_statistics_of_the_final_weights():
    """With bn_recalibration each batch-norm layer ends with the equal-weight average, over one
    pass of the training set in its order, of the batch statistics of the final weights."""
    import copy

    from poisongrid.training import fit

    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 255, (100, 3, 16, 16), dtype=np.uint8), rng.integers(0, 3, 100)
    spec = {"model": "smallcnn", "epochs": 2, "batch_size": 32, "lr": 3e-2, "weight_decay": 0.0, "augment": "none",
            "bn_recalibration": True}
    res = fit(spec, x, y, 3, seed=0, device=torch.device("cpu"))
    plain = fit({**spec, "bn_recalibration": False}, x, y, 3, seed=0, device=torch.device("cpu"))
    bn = next(m for m in res.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # Independently: the batch means and unbiased variances of that layer's input, batch by batch.
    probe = copy.deepcopy(res.model).train()
    first = next(m for m in probe.modules() if isinstance(m, torch.nn.BatchNorm2d))
    means, variances = [], []
    def grab(module, inp, out):
        means.append(inp[0].mean((0, 2, 3)))
        variances.append(inp[0].var((0, 2, 3), unbiased=True))

    first.register_forward_hook(grab)
    with torch.no_grad():
        for s in range(0, 100, 32):
            probe(torch.from_numpy(x[s:s + 32]).float() / 255)
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6)
    # The weights are the same training's; only the statistics differ.
    torch.testing.assert_close(dict(res.model.named_parameters())["1.0.weight"], dict(plain.model.named_parameters())["1.0.weight"])
    assert not torch.allclose(bn.running_mean, next(m for m in plain.model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_mean)
