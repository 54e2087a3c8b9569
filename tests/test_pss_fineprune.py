"""PSS (intra-class loss, feature sensitivity, D-BR unlearning) and fine-pruning."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import planted
from poisongrid import config
from poisongrid.detectors import DETECTORS, read_scores
from poisongrid.detectors.pss import PSS, intraclass_loss, strong_transform
from poisongrid.errors import ConfigError
from poisongrid.models import MODELS, build_model, conv_head, last_conv
from poisongrid.remedies import REMEDIES, FinalTraining
from poisongrid.remedies.fine_pruning import channel_activation, prune_until
from poisongrid.training import fit, load_model, save_model

CPU = torch.device("cpu")


def test_intraclass_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(7, 5, generator=g)
    y = torch.tensor([2, 0, 2, 5, 0, 2, 5])
    got = intraclass_loss(f, y)
    fn = f.numpy().astype(np.float64)
    yn = y.numpy()
    centres = [fn[yn == c].mean(0) for c in (0, 2, 5)]
    centres = [c / np.linalg.norm(c) for c in centres]
    total = sum(centres[i] @ centres[j] for i in range(3) for j in range(3) if i != j)
    assert got.item() == pytest.approx(total / 9, rel=1e-6)
    # One class in the batch: nothing to push apart.
    assert intraclass_loss(f[:3], torch.zeros(3, dtype=torch.long)).item() == 0.0


def test_strong_transform_identity_and_rotation():
    x = torch.rand(2, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(strong_transform(x, g, 0.0, 0.0), x)
    y = strong_transform(x, g, 180.0, 0.2)
    assert y.shape == x.shape and not torch.equal(y, x)


def _planted(n=480, size=12, seed=0):
    """4 classes told apart by colour; 10% of classes 0-2 carry a white corner patch and label 3."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [120, 120, 120]])
    x = colours[y][:, :, None, None] + rng.normal(0, 20, (n, 3, size, size))
    poisoned = np.zeros(n, bool)
    poisoned[rng.choice(np.flatnonzero(y != 3), n // 10, replace=False)] = True
    x[poisoned, :, :3, :3] = 255
    labels = np.where(poisoned, 3, y)
    return np.clip(x, 0, 255).astype(np.uint8), labels.astype(np.int64), poisoned


@pytest.mark.slow
def test_pss_ranks_planted_poison_above_clean(tmp_path):
    from sklearn.metrics import roc_auc_score

    x, labels, poisoned = _planted(n=240, size=8)
    training = {"model": "smallcnn", "epochs": 4, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-4, "augment": "none"}
    warm = fit(training, x, labels, 4, seed=0, device=CPU).model
    det = PSS()
    det.view, det.cell = planted.view(x, labels, model=warm, num_classes=4, training=training), {"dataset": "planted"}
    meta = det.score(tmp_path / "s.parquet")
    s = read_scores(tmp_path / "s.parquet")[0].sort_values("index")["score"].to_numpy()
    assert len(s) == len(labels) and len(meta["intraclass_loss"]) == 3
    auc = roc_auc_score(poisoned, s)
    print(f"PSS planted AUROC {auc:.3f}")
    assert auc > 0.7


def test_pss_unlearn_partition():
    n = 100
    scores = np.arange(n, dtype=float)[::-1].copy()  # example 0 the most suspicious
    bona = np.zeros(n, bool)
    bona[2] = True
    man = pd.DataFrame({"index": np.arange(n), "label": np.zeros(n, int), "bona_fide": bona})
    w = REMEDIES.get("pss_unlearn")(r_poison=0.05, r_clean=0.8).weights(scores, man, {})
    assert set(np.flatnonzero(w == -1)) == {0, 1, 3, 4, 5}  # top 5, the bona fide one skipped
    assert set(np.flatnonzero(w == 1)) == set(range(20, 100))  # the 80 lowest scores
    assert (w[[2] + list(range(6, 20))] == 0).all()


def _job(x, labels, bona, model, training, tmp=None):
    return FinalTraining(view=planted.view(x, labels, bona, copy.deepcopy(model), training=training),
                         weights=np.ones(len(labels), np.float32), plan_meta={})


def test_pss_unlearn_alternates_ascent_and_descent():
    x, labels, _ = _planted(n=96, size=8)
    training = {"model": "smallcnn", "epochs": 1, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.0, "augment": "none"}
    attacked = fit(training, x, labels, 4, seed=0, device=CPU).model
    rem = REMEDIES.get("pss_unlearn")(epochs=2, r_poison=0.1, r_clean=0.5)
    w = rem.weights(np.random.default_rng(0).random(96), pd.DataFrame({"bona_fide": np.zeros(96, bool)}), {})
    job = _job(x, labels, np.zeros(96, bool), attacked, training)
    job.weights = w
    res = rem.train(job)
    assert [p for p, _ in job.phases] == ["ascent0", "descent0", "ascent1", "descent1"]
    assert res is job.phases[-1][1] and res.model is not None and job.phases[0][1].model is None
    assert not torch.equal(res.model.state_dict()["8.weight"], attacked.state_dict()["8.weight"])


EXPECTED_LAST_CONV = {
    "lenet_s": "4", "mobilenetv2_s": "5.0", "resnet18": "1.layer4.1.conv2", "resnet34": "1.layer4.2.conv2",
    "resnet50": "1.layer4.2.conv3", "resnet_s": "1.stages.3.shortcut.0", "resnet_s1": "1.stages.3.shortcut.0",
    "resnet_s2": "1.stages.3.shortcut.0", "smallcnn": "5.0", "vgg_s": "12.0",
    "densenet121": "1.features.denseblock4.denselayer16.conv2", "squeezenet1_0": "1.features.12.expand3x3",
    "vgg16_bn": "1.features.40",
}
# Where the last feature map concatenates several convs (dense blocks, fire modules), its channels
# are not the last conv's.
MAP_CHANNELS = {"densenet121": 1024, "squeezenet1_0": 512}


@pytest.mark.parametrize("name", [pytest.param(m, marks=pytest.mark.slow)
                                  if (m.startswith("resnet") and m[6:7].isdigit()) or m in ("densenet121", "vgg16_bn")
                                  else m for m in MODELS.names()])
def test_last_conv_of_every_registered_model(name):
    assert set(EXPECTED_LAST_CONV) == set(MODELS.names())
    model = build_model(name, 10, 32)
    got, conv = last_conv(model)
    assert got == EXPECTED_LAST_CONV[name] and dict(model.named_modules())[got] is conv
    head, c, k = conv_head(model)
    assert c == MAP_CHANNELS.get(name, conv.out_channels) and head.in_features == c * k
    # The head reads the conv map channel-major: zeroing channel j's map zeroes inputs [j*k, (j+1)*k).
    grabbed = []
    h = head.register_forward_hook(lambda m, i, o: grabbed.append(i[0]))
    model.eval()(torch.rand(2, 3, 32, 32))
    h.remove()
    assert grabbed[0].shape == (2, c * k)


def _planted_pruning():
    """A 1x1 identity conv on 3 channels + ReLU, pooled; class 1 wins iff the example's own channel
    survives. Groups of 1, 2 and 7 examples light channels 0, 1, 2: mean activations 0.1 < 0.2 < 0.7,
    so pruning 1, 2, 3 channels leaves accuracy 0.9, 0.7, 0."""
    conv = nn.Conv2d(3, 3, 1)
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        conv.bias.zero_()
        lin.weight.copy_(torch.tensor([[0.0, 0, 0], [10, 10, 10]]))
        lin.bias.copy_(torch.tensor([0.5, 0.0]))
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)
    group = np.array([0] + [1] * 2 + [2] * 7)
    x = np.zeros((10, 3, 4, 4), np.uint8)
    x[np.arange(10), group] = 255
    return model, x, np.ones(10, np.int64)


@pytest.mark.parametrize("max_drop, ratio, want", [(0.05, 1.0, 0), (0.15, 1.0, 1), (0.35, 1.0, 2), (0.35, 0.4, 1),
                                                   (1.0, 1.0, 3)])
def test_pruning_stops_at_the_accuracy_threshold(max_drop, ratio, want):
    model, x, y = _planted_pruning()
    act = channel_activation(model, x, CPU, 4)
    np.testing.assert_allclose(act, [0.1, 0.2, 0.7], rtol=1e-6)
    order = np.argsort(act)
    count, acc0, acc = prune_until(model, x, y, CPU, 4, order, 1, int(np.floor(ratio * 3)), max_drop)
    assert count == want and acc0 == 1.0
    assert acc == pytest.approx([1.0, 0.9, 0.7, 0.0][want])
    head = model[4]
    assert (head.weight[:, order[:want]] == 0).all() and (want == 3 or (head.weight[:, order[want:]] != 0).any())


def test_fine_prune_channels_stay_zero_through_finetuning_and_save(tmp_path):
    x, labels, _ = _planted(n=96, size=8)
    training = {"model": "smallcnn", "epochs": 2, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-2, "augment": "none"}
    attacked = fit(training, x, labels, 4, seed=0, device=CPU).model
    bona = np.zeros(96, bool)
    bona[:40] = True
    rem = REMEDIES.get("fine_prune")(data="bona_fide", max_acc_drop=1.0, prune_ratio=0.5, finetune_epochs=2, finetune_lr=1e-2)
    np.testing.assert_array_equal(rem.weights(None, pd.DataFrame({"bona_fide": bona}), {}), np.ones(96, np.float32))
    job = _job(x, labels, bona, attacked, training)
    res = rem.train(job)
    assert [p for p, _ in job.phases] == ["finetune"] and len(rem.pruned) == 32
    pruned = rem.pruned
    head = conv_head(res.model, 8)[0]
    assert (head.weight[:, pruned] == 0).all() and (head.weight[:, [c for c in range(64) if c not in pruned]] != 0).any()
    assert set(res.model.state_dict()) == set(attacked.state_dict())  # a plain model again
    save_model(tmp_path / "m.pt", res.model, {"model": "smallcnn", "num_classes": 4, "image_size": 8})
    loaded, _ = load_model(tmp_path / "m.pt", CPU)
    assert (conv_head(loaded, 8)[0].weight[:, pruned] == 0).all()
    # The fine-tuning did change the surviving weights.
    assert not torch.equal(head.weight[:, [c for c in range(64) if c not in pruned]],
                           conv_head(attacked, 8)[0].weight[:, [c for c in range(64) if c not in pruned]])


def _cfg(**extra):
    return {"device": "cpu", "bona_fide": {"n_clean": 60},
            "datasets": {"digits": {"image_size": 16, "model": "smallcnn", "epochs": 3, "batch_size": 64, "lr": 0.003,
                                    "attacks": {"patch": {"ratio": 0.05}}}},
            "defender_models": {"pss_warmup": {"epochs": 2, "augment": "none", "record": "final", "optimizer": "sgd",
                                               "lr": 0.01, "weight_decay": 5e-4}},
            "detectors": {"pss": {"type": "pss", **extra.get("det", {})}},
            "defenses": {"pss": {"detector": "pss", "remedy": "pss_unlearn", **extra.get("pss", {})},
                         "fp": {"remedy": "fine_prune", **extra.get("fp", {})}}}


def test_config_accepts_the_defaults():
    cfg = config.validate(_cfg())
    assert cfg["detectors"]["pss"]["model"] == "pss_warmup"
    assert DETECTORS.get("pss").gpu and REMEDIES.get("fine_prune").reads_model(cfg["defenses"]["fp"]) == "attacked"


@pytest.mark.parametrize("where, bad", [
    ("det", {"intraclass_epochs": 0}), ("det", {"intraclass_epochs": 2.5}), ("det", {"translate": 1.5}),
    ("det", {"degrees": 0}), ("det", {"lr": -1}), ("det", {"schedule_epochs": 2}), ("det", {"model": "nope"}),
    ("pss", {"r_poison": 0}), ("pss", {"r_clean": 1.2}), ("pss", {"r_poison": 0.3, "r_clean": 0.8}),
    ("pss", {"epochs": 0}), ("pss", {"ascent_clamp": 0}), ("pss", {"lr": 0}), ("pss", {"model": "nope"}),
    ("fp", {"max_acc_drop": -0.1}), ("fp", {"prune_ratio": 0}), ("fp", {"prune_ratio": 1.5}), ("fp", {"prune_step": 0}),
    ("fp", {"finetune_epochs": 0}), ("fp", {"finetune_lr": 0}), ("fp", {"detector": "pss"}),
    ("fp", {"data": "test"}), ("fp", {"finetune_optimizer": "lbfgs"}), ("fp", {"finetune_momentum": 1.0}),
])
def test_bad_params_are_config_errors(where, bad):
    with pytest.raises(ConfigError):
        config.validate(_cfg(**{where: bad}))


def test_validation_split_is_stratified_seeded_and_left_out_of_evaluation():
    from poisongrid.validation import evaluated, split

    labels = np.repeat(np.arange(4), [40, 20, 100, 8])
    rows = split(labels, 0.25, seed=3)
    assert list(np.bincount(labels[rows], minlength=4)) == [10, 5, 25, 2]
    assert np.array_equal(rows, split(labels, 0.25, seed=3)) and not np.array_equal(rows, split(labels, 0.25, seed=4))
    assert len(split(labels, 0.25, seed=3, stratified=False)) == 42
    keep = evaluated(len(labels), rows)
    assert keep.sum() == len(labels) - len(rows) and not keep[rows].any()


def test_fine_prune_prunes_against_and_tunes_on_the_held_out_split(monkeypatch):
    from poisongrid.remedies.fine_pruning import accuracy

    x, labels, _ = _planted(n=96, size=8)
    xv, yv, _ = _planted(n=40, size=8, seed=5)
    training = {"model": "smallcnn", "epochs": 2, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-2, "augment": "none"}
    attacked = fit(training, x, labels, 4, seed=0, device=CPU).model
    job = FinalTraining(view=planted.view(x, labels, np.zeros(96, bool), copy.deepcopy(attacked), training=training,
                                          validation=(xv, yv)), weights=np.ones(96, np.float32), plan_meta={})
    seen = {}
    real_fit = job.fit

    def spy(images, labels_, **kw):
        seen.update(n=len(labels_), training=kw["training"])
        return real_fit(images, labels_, **{**kw, "training": {**kw["training"], "epochs": 1}})

    monkeypatch.setattr(job, "fit", spy)
    rem = REMEDIES.get("fine_prune")()
    assert REMEDIES.get("fine_prune").uses_validation({}) and not REMEDIES.get("fine_prune").uses_validation({"data": "bona_fide"})
    rem.train(job)
    # The unpruned accuracy it compared against is the attacked model's on the held-out images.
    assert rem.accuracy[0] == accuracy(attacked.eval(), xv, yv, CPU)
    assert seen["n"] == 40 and seen["training"] == {"epochs": 100, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9,
                                                     "weight_decay": 5e-4, "schedule": "cosine", "nesterov": False}


@pytest.mark.slow
def test_every_defense_of_a_grid_with_fine_pruning_is_evaluated_without_the_held_out_split(tmp_path):
    from poisongrid import stages
    from poisongrid.jobs import run_job
    from poisongrid.training import load_model, predict
    from poisongrid.validation import evaluated, split

    cfg = config.validate({**_cfg(fp={"finetune_epochs": 2}), "validation": {"fraction": 0.25},
                           "defenses": {"none": {"remedy": "none"}, "fp": {"remedy": "fine_prune", "finetune_epochs": 2}}})

    def run(stage, **extra):
        return run_job(cfg, stage, str(tmp_path), dataset="digits", scenario="single-patch", seed=0, **extra)

    for stage in ("poison", "bonafide"):
        run(stage)
    run("pretrain", model="attacked")
    ds = stages.get_dataset(config.stage_spec(cfg, "poison", "digits", "single-patch", 0))
    keep = evaluated(len(ds.test.labels), split(ds.test.labels, 0.25, 0))
    for d in ("none", "fp"):
        run("plan", defense=d)
        if d == "fp":
            tmeta, _, _ = run("train", defense=d)
            assert tmeta["n_trained_on"] == 1437 and [p["phase"] for p in tmeta["phases"]] == ["finetune"]
        m, inp, _ = run("evaluate", defense=d)
        assert m["n_test"] == keep.sum() == 270 and m["validation"]["n_held_out"] == 90
        model, _ = load_model(inp["weights"], CPU)
        direct = float((predict(model, ds.test.images[keep], CPU) == ds.test.labels[keep]).mean())
        assert m["clean_accuracy"] == direct
