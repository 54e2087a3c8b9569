"""CBD: the per-batch weights, the MI critic, the remedy on a planted backdoor, config errors."""
import copy

import numpy as np
import pandas as pd
import pytest
import torch

import planted
from poisongrid import config
from poisongrid.detectors import DETECTORS
from poisongrid.errors import ConfigError
from poisongrid.remedies import REMEDIES, FinalTraining
from poisongrid.remedies.cbd_objective import MICritic, cbd_weights
from poisongrid.training import fit


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_weights_match_a_hand_computation():
    lb = torch.tensor([0.1, 2.0, 0.5, 0.0])
    lc = torch.tensor([1.0, 0.5, 0.5, 0.3])
    raw = [0.1 / 1.1, 2.0 / 2.5, 0.5 / 1.0, 0.0]
    want = np.array(raw) * 4 / sum(raw)
    np.testing.assert_allclose(cbd_weights(lb, lc).numpy(), want, rtol=1e-6)
    assert cbd_weights(lb, lc).mean().item() == pytest.approx(1.0)
    # No division by zero when the backdoored model fits the whole batch exactly.
    np.testing.assert_array_equal(cbd_weights(torch.zeros(3), torch.ones(3)).numpy(), np.ones(3))


def _critic_estimate(dependent: bool, steps: int = 120, d: int = 8) -> float:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    def pair(n):
        r = torch.randn(n, d, generator=g)
        return r, (r + 0.3 * torch.randn(n, d, generator=g)) if dependent else torch.randn(n, d, generator=g)

    critic = MICritic(d, d, 32)
    opt = torch.optim.Adam(critic.parameters(), lr=REMEDIES.get("cbd").params["critic_lr"])
    for _ in range(steps):
        opt.zero_grad()
        (-0.01 * critic(*pair(64))).backward()
        opt.step()
        critic.lipschitz_()
    critic.eval()
    with torch.no_grad():
        return float(critic(*pair(2048)))


def test_critic_estimates_more_dependence_for_dependent_features():
    dep, ind = _critic_estimate(True), _critic_estimate(False)
    assert dep > 0.2 and abs(ind) < 0.05 and dep > ind + 0.2


def _synthetic(n, seed, poison_frac=0.1):
    """16x16 images of 4 classes (a faint bar whose row is the class, on noise); a white 3x3 corner
    patch relabelled to class 2 on poison_frac of them (never class 2 itself)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(70, 35, (n, 3, 16, 16))
    for c in range(4):
        x[y == c, :, 2 + 3 * c:4 + 3 * c, 2:11] += 25
    x = np.clip(x, 0, 255).astype(np.uint8)
    poisoned = np.zeros(n, bool)
    poisoned[rng.choice(np.flatnonzero(y != 2), int(poison_frac * n), replace=False)] = True
    x[poisoned, :, -3:, -3:] = 255
    return x, np.where(poisoned, 2, y), poisoned


TINY = {"model": "smallcnn", "epochs": 4, "batch_size": 32, "lr": 0.003, "weight_decay": 1e-4, "optimizer": "adamw",
        "augment": "crop_flip"}


def test_remedy_down_weights_the_planted_backdoor():
    dev = torch.device("cpu")
    x, y, poisoned = _synthetic(384, 0)
    backdoored = fit({**TINY, "augment": "none"}, x, y, 4, seed=0, device=dev, record="final")
    lb = backdoored.losses[0]
    assert lb[poisoned].mean() < lb[~poisoned].mean()  # the premise: B fits the backdoor first
    # The cbd detector is -l_B: higher for the poisoned examples.
    assert DETECTORS.get("cbd").default_model == "backdoored" and DETECTORS.get("cbd").negated_loss
    remedy = REMEDIES.get("cbd")()
    assert (remedy.weights(None, pd.DataFrame({"index": np.arange(len(y))}), {}) == 1).all()
    job = FinalTraining(view=planted.view(x, y, model=backdoored.model, num_classes=4, training=TINY),
                        weights=np.ones(len(y), np.float32), plan_meta={})
    res = remedy.train(job)
    assert [p for p, _ in job.phases] == ["cbd"] and len(res.train_loss) == TINY["epochs"]
    w = remedy.objective.mean_weight()
    assert w[poisoned].mean() < 0.85 * w[~poisoned].mean()
    np.testing.assert_allclose(w.mean(), 1.0, atol=0.05)
    # The hooks are gone from both models once training ends.
    assert not remedy.objective.hooks and all(not m._forward_hooks for m in res.model.modules())


def test_fit_calls_epoch_start_with_the_model_it_trains():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (24, 3, 8, 8), dtype=np.uint8), rng.integers(0, 3, 24)
    seen = []
    res = fit({**TINY, "epochs": 2, "batch_size": 12, "augment": "none"}, x, y, 3, seed=0, device=torch.device("cpu"),
              epoch_start=lambda e, m: seen.append((e, m)))
    assert [e for e, _ in seen] == [0, 1] and all(m is res.model for _, m in seen)


BASE = {"device": "cpu", "bona_fide": {"n_clean": 60},
        "datasets": {"digits": {"image_size": 16, "model": "smallcnn", "epochs": 3, "batch_size": 64, "lr": 0.003,
                                "attacks": {"patch": {"ratio": 0.05}}}},
        "defender_models": {"backdoored": {"epochs": 2, "optimizer": "adamw", "lr": 0.001, "record": "final"}},
        "detectors": {"cbd": {"type": "cbd"}}}


def _validate(defense: dict, **over):
    cfg = copy.deepcopy(BASE)
    cfg.update(over)
    cfg["defenses"] = {"cbd": {"detector": "cbd", "remedy": "cbd", **defense}}
    return config.validate(cfg)


def test_config_defaults_and_bad_params():
    cfg = _validate({})
    assert cfg["detectors"]["cbd"]["model"] == "backdoored"
    d = cfg["defenses"]["cbd"]
    assert (d["model"], d["mi_weight"], d["critic_lr"]) == ("backdoored", 0.01, 0.2)
    assert REMEDIES.get("cbd").reads_model(d) == "backdoored"
    for bad in ({"mi_weight": -1}, {"mi_weight": "x"}, {"critic_lr": 0}, {"critic_hidden": 1.5}, {"critic_hidden": -2},
                {"critic_step_epochs": 0}, {"critic_step_epochs": True}, {"model": "nope"}, {"unknown": 1}):
        with pytest.raises(ConfigError):
            _validate(bad)
    with pytest.raises(ConfigError):  # the detector's default model must be configured
        _validate({}, defender_models={})


@pytest.mark.slow
def test_a_digits_cell_runs_cbd_end_to_end(tmp_path):
    """pretrain the backdoored model, score (-l_B), plan (all ones), train (CBD), evaluate."""
    from poisongrid.jobs import run_job

    cfg = _validate({})

    def run(stage, **extra):
        return run_job(cfg, stage, str(tmp_path), dataset="digits", scenario="multi", seed=0, **extra)

    run("poison")
    run("bonafide")
    run("pretrain", model="backdoored")
    smeta, _, _ = run("score", detector="cbd")
    assert smeta["negated_loss"] and smeta["defender_model"]["model_name"] == "backdoored"
    pmeta, _, _ = run("plan", defense="cbd")
    tmeta, inp, _ = run("train", defense="cbd")
    assert "backdoored" in str(inp["weights"]) and (tmeta["n_trained_on"], tmeta["n_ascent"]) == (1437, 0)
    assert [p["phase"] for p in tmeta["phases"]] == ["cbd"] and tmeta["epochs"] == 3
    m, _, _ = run("evaluate", defense="cbd")
    assert m["clean_accuracy"] > 0.3


def test_schedules_follow_the_reference_rates():
    from poisongrid.training import OPTIMIZERS, lr_schedule

    def rates(training, epochs=80):
        p = [torch.nn.Parameter(torch.zeros(2))]
        opt = OPTIMIZERS.get(training["optimizer"])(p, {"weight_decay": 1e-4, **training})
        sched = lr_schedule(opt, training, epochs)
        out = []
        for _ in range(epochs):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out, opt

    ref = REMEDIES.get("cbd").clean_training(REMEDIES.get("cbd").params)
    lr, opt = rates(ref)
    # CBD's code: 0.1 for epochs 1-20, 0.01 for 21-70, 0.001 after (epochs counted from 0 here).
    np.testing.assert_allclose(lr, [0.1] * 20 + [0.01] * 50 + [0.001] * 10, rtol=1e-9)
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    const, _ = rates({"optimizer": "adamw", "lr": 1e-3, "schedule": "constant"}, 5)
    assert const == [1e-3] * 5
    cos, _ = rates({"optimizer": "adamw", "lr": 1e-3}, 5)
    np.testing.assert_allclose(cos, [1e-3 * (1 + np.cos(np.pi * e / 5)) / 2 for e in range(5)])


def test_power_norm_matches_the_exact_value_where_power_iteration_is_exact():
    from poisongrid.remedies.cbd_objective import power_norm

    a, b = torch.tensor([3.0, -1.0, 2.0]), torch.tensor([0.5, 4.0])
    # A rank-one matrix's largest singular value is |a| |b|; power iteration finds it exactly.
    assert power_norm(torch.outer(a, b)).item() == pytest.approx(float((a.norm() * b.norm()).sqrt()), rel=1e-5)
    # A bias counts as one column: its norm.
    assert power_norm(a).item() == pytest.approx(float(a.norm().sqrt()), rel=1e-6)
    critic = MICritic(4, 4, 8)
    before = [q.detach().clone() for q in critic.parameters()]
    critic.lipschitz_()
    for q, q0 in zip(critic.parameters(), before):
        torch.testing.assert_close(q.detach(), q0 / power_norm(q0))


def test_the_critic_makes_its_own_pass_then_stays_fixed():
    """Before each epoch the critic takes one step per batch of a pass over the data, with the clean
    model forward only (its weights untouched); during the clean model's pass it does not change."""
    from poisongrid.remedies.cbd_objective import CBDObjective

    x, y, _ = _synthetic(96, 3)
    b = fit({**TINY, "epochs": 1, "augment": "none"}, x, y, 4, seed=0, device=torch.device("cpu")).model
    c = fit({**TINY, "epochs": 1, "augment": "none"}, x, y, 4, seed=1, device=torch.device("cpu")).model
    p = {**REMEDIES.get("cbd").params}
    obj = CBDObjective(b, planted.view(x, y).images, y, p, {**TINY, "batch_size": 32}, torch.device("cpu"), 0)
    weights = {k: v.clone() for k, v in c.state_dict().items() if "running" not in k and "num_batches" not in k}
    obj.epoch_start(0, c)
    assert obj.critic_steps == 3  # 96 images in batches of 32
    for k, v in weights.items():
        torch.testing.assert_close(c.state_dict()[k], v)
    assert not any(q.requires_grad for q in obj.critic.parameters())
    critic = [q.clone() for q in obj.critic.parameters()]
    xb = torch.from_numpy(x[:32]).float() / 255
    c.train()
    per = torch.nn.functional.cross_entropy(c(xb), torch.from_numpy(y[:32]), reduction="none")
    loss = obj(c, xb, torch.from_numpy(y[:32]), per, torch.arange(32))
    loss.backward()
    assert obj.critic_steps == 3 and all(torch.equal(q, q0) for q, q0 in zip(obj.critic.parameters(), critic))
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in c.parameters())
    obj.close()
