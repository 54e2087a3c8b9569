"""Input-aware dynamic backdoor (Nguyen & Tran 2020): a generator and a mask network give every
image its own trigger."""
from __future__ import annotations

import functools
import math

import numpy as np

from ..errors import ConfigError
from .base import ATTACKS, Attack, LearnJob, _short

_EPS = 1e-7  # the paper's epsilon in the output squashing and the diversity ratio


@ATTACKS.register("dynamic")
class Dynamic(Attack):
    """Dirty-label, all-to-one: x' = x * (1 - m) + G(x) * m, m = threshold(M(x)).

    G (the pattern generator, C output channels) and M (the mask network, one channel shared by
    all colour channels) are encoder-decoder CNNs (`depth` steps of conv-conv-maxpool, a middle
    conv, `depth` steps of upsample-conv-conv; conv 3x3 + BatchNorm + ReLU, the last conv without
    ReLU), squashed to [0, 1] by tanh(.) / (2 + eps) + 0.5; threshold(v) = tanh(20 v - 10) /
    (2 + eps) + 0.5 is the paper's soft binarisation (kept soft as in the reference: on digits
    about 2% of the pixels have m > 0.5, while faint mask values still move about 20% of the
    pixels by a grey level or more). `learn` trains them as the paper does:
    M first (`mask_epochs`) on lambda_norm * mean(relu(m - mask_density)) plus lambda_div times
    the diversity loss ||x1 - x2|| / ||m(x1) - m(x2)||; then G jointly with a helper classifier
    (`model`), each batch holding a backdoor part (p_attack, relabelled to the target), a cross
    part (p_cross: an image carrying another image's trigger, label kept) and a clean rest, with
    the same diversity loss on G's patterns. Only G and M are kept: the victim learns the
    backdoor from the poisoned training set.

    Deviations from the reference code (VinAI's release): the reference runs hundreds of epochs
    with step schedules; here the classifier (SGD, momentum 0.9, wd 5e-4) and G (Adam, betas
    (0.5, 0.9)) follow a cosine schedule over `epochs`, M's Adam drops 10x at 40% and 80% of
    `mask_epochs` (the reference: epochs 10 and 20 of 25). No data augmentation during learning
    and no input normalisation (poisongrid's models take [0, 1] input, so G's pattern is used
    as is). The upsampling restores each level's exact size, so any image size works. Triggers
    are computed one image at a time on the CPU, so an image's trigger never depends on its batch
    (bitwise); the cost is about 10 ms per image at width 32, depth 3 (one CPU thread).

    The artifact holds every state-dict entry of G and M ('gen.<name>', 'mask.<name>'), the
    architecture (arch_width, arch_depth) and the helper's test numbers (helper_clean_accuracy,
    helper_asr, mask_mean) for the record."""

    name = "dynamic"
    defaults: dict = {}
    learn_defaults = {"model": "smallcnn", "epochs": 20, "mask_epochs": 10, "lr": 0.01, "lr_generator": 0.01,
                      "lr_mask": 0.01, "p_attack": 0.1, "p_cross": 0.1, "lambda_div": 1.0, "lambda_norm": 100.0,
                      "mask_density": 0.032, "width": 16, "depth": 2}

    @classmethod
    def check_learn(cls, settings: dict, key: str, deep: bool = True) -> dict:
        s = super().check_learn(settings, key, deep)
        for k in ("p_attack", "p_cross", "mask_density"):
            if s[k] >= 1:
                raise ConfigError(f"{key}.{k}", s[k], "a number in (0, 1)")
        if s["p_attack"] + s["p_cross"] >= 1:
            raise ConfigError(f"{key}.p_cross", s["p_cross"], f"a number below 1 - p_attack = {1 - s['p_attack']:g}")
        if s["depth"] > 5:
            raise ConfigError(f"{key}.depth", s["depth"], "an integer in [1, 5]")
        return s

    # VinAI's code: n_iters 600 epochs, the first 25 of them the mask's pre-training.
    reference_learn = {"epochs": 575, "mask_epochs": 25}
    reference_source = "input-aware backdoor code: 25 mask + 575 joint epochs"

    @classmethod
    def learn_epochs(cls, settings: dict) -> float:
        # M's pre-training passes the data through M twice; the joint phase through C, G and M.
        return float(settings.get("epochs", 0)) * 1.5 + float(settings.get("mask_epochs", 0)) * 0.5

    @classmethod
    def learn(cls, job: LearnJob) -> dict[str, np.ndarray]:
        s = cls.check_learn(job.settings, f"attacks.{cls.name}.learn", deep=False)
        gen, mask, stats = train_dynamic(job.dataset.train.images, job.dataset.train.labels, job.dataset.num_classes,
                                         job.target, s, seed=job.seed, device=job.device, batch_size=job.training["batch_size"],
                                         test=(job.dataset.test.images, job.dataset.test.labels), log=job.log)
        out = {f"gen.{k}": v.detach().cpu().numpy() for k, v in gen.state_dict().items()}
        out.update({f"mask.{k}": v.detach().cpu().numpy() for k, v in mask.state_dict().items()})
        out.update(arch_width=np.int64(s["width"]), arch_depth=np.int64(s["depth"]),
                   **{k: np.float64(v) for k, v in stats.items()})
        return out

    def _setup(self) -> None:
        self.gen = self.mask = None
        if self.artifact is None:
            return
        width, depth = (self._arch(k, hi) for k, hi in (("arch_width", 4096), ("arch_depth", 5)))
        c = self.image_shape[0]
        self.gen = _load(_build_net(c, c, width, depth), self.artifact, "gen.", self._key("gen"))
        self.mask = _load(_build_net(c, 1, width, depth), self.artifact, "mask.", self._key("mask"))

    def _arch(self, key: str, hi: int) -> int:
        v = np.asarray(self._artifact(key))
        if v.shape != () or v.dtype.kind not in "iu" or not 1 <= int(v) <= hi:
            raise ConfigError(self._key(key), _short(v), f"an integer in [1, {hi}]")
        return int(v)

    def triggers(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pattern, mask) in [0, 1] for uint8 or [0, 255] float images: pattern (N, C, H, W),
        mask (N, 1, H, W), one image at a time on the CPU."""
        import torch

        if self.gen is None:
            self._artifact("gen.")
        x = np.asarray(images, dtype=np.float32) / np.float32(255)
        pats, masks = np.empty_like(x), np.empty((len(x), 1, *x.shape[2:]), np.float32)
        with torch.no_grad():
            for i in range(len(x)):
                xi = torch.from_numpy(x[i:i + 1])
                pats[i] = self.gen(xi)[0].numpy()
                masks[i] = threshold(self.mask(xi))[0].numpy()
        return pats, masks

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        pattern, m = self.triggers(x)
        return x + (pattern * np.float32(255) - x) * m


def threshold(v):
    """The paper's soft binarisation of the mask network's [0, 1] output."""
    import torch

    return torch.tanh(v * 20 - 10) / (2 + _EPS) + 0.5


@functools.lru_cache(maxsize=None)
def _net_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    def block(cin, cout, relu=True):
        layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, eps=1e-5, momentum=0.05)]
        return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)

    class EncoderDecoder(nn.Module):
        """conv-conv-pool per level down, a middle conv, upsample-conv-conv per level up; the
        output squashed to [0, 1]."""

        def __init__(self, cin, cout, width, depth):
            super().__init__()
            chans = [width * 2 ** i for i in range(depth)]
            self.down = nn.ModuleList()
            prev = cin
            for ch in chans:
                self.down.append(nn.Sequential(block(prev, ch), block(ch, ch)))
                prev = ch
            self.middle = block(prev, prev)
            self.up = nn.ModuleList()
            for i in range(depth):
                last = i == depth - 1
                nxt = cout if last else prev // 2
                self.up.append(nn.Sequential(block(prev, prev), block(prev, nxt, relu=not last)))
                prev = nxt

        def forward(self, x):
            sizes = []
            for level in self.down:
                x = level(x)
                sizes.append(x.shape[-2:])
                x = F.max_pool2d(x, 2, ceil_mode=True)  # ceil: odd sizes keep their border
            x = self.middle(x)
            for level, size in zip(self.up, reversed(sizes)):
                x = level(F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False))
            return torch.tanh(x) / (2 + _EPS) + 0.5

    return EncoderDecoder


def _build_net(cin: int, cout: int, width: int, depth: int):
    return _net_class()(cin, cout, width, depth)


def _load(net, artifact: dict, prefix: str, key: str):
    """Load a net's state dict from the `prefix`-ed arrays; a missing or misshapen array is a
    ConfigError. Returns the net in eval mode with frozen parameters."""
    import torch

    state = {}
    for k, ref in net.state_dict().items():
        if prefix + k not in artifact:
            raise ConfigError(f"{key}.{k}", "missing", "the file the trigger stage makes (--trigger)")
        v = np.asarray(artifact[prefix + k])
        if v.shape != tuple(ref.shape):
            raise ConfigError(f"{key}.{k}", _short(v), f"an array of shape {tuple(ref.shape)}")
        state[k] = torch.from_numpy(v.astype(np.int64 if ref.dtype == torch.int64 else np.float32))
    extra = sorted(k for k in artifact if k.startswith(prefix) and k[len(prefix):] not in state)
    if extra:
        raise ConfigError(key, extra[:3], "only the arrays of this architecture (arch_width, arch_depth)")
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def _diversity(x1, x2, t1, t2):
    """mean over the batch of ||x1 - x2|| / ||t1 - t2|| (RMS distances): low when different
    images get different triggers."""
    import torch

    dx = torch.sqrt(((x1 - x2) ** 2).flatten(1).mean(1))
    dt = torch.sqrt(((t1 - t2) ** 2).flatten(1).mean(1))
    return (dx / (dt + _EPS)).mean()


def train_dynamic(images: np.ndarray, labels: np.ndarray, num_classes: int, target: int, s: dict, *, seed: int,
                  device="cpu", batch_size: int = 128, test=None, log=None):
    """Train the mask network, then the generator with a helper classifier (see Dynamic).
    Returns (generator, mask network, stats) with the nets in eval mode on the CPU; stats holds
    the helper's clean accuracy and attack success on up to 1000 `test` images when given.
    Deterministic on the CPU for a given `seed`."""
    import torch
    import torch.nn.functional as F

    from ..models import build_model

    device = torch.device(device)
    x_all = np.asarray(images)
    n, c, h, w = x_all.shape
    data = torch.from_numpy(x_all).to(device)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    gen_rng = torch.Generator().manual_seed(int(seed))
    bs = min(int(batch_size), n)
    with torch.random.fork_rng(devices=[]):  # nets' initial weights from the seed, global RNG left alone
        torch.manual_seed(int(seed))
        netM = _build_net(c, 1, s["width"], s["depth"]).to(device)
        netG = _build_net(c, c, s["width"], s["depth"]).to(device)
        netC = build_model(s["model"], num_classes, h).to(device)

    def batches():
        """Pairs of index batches from two independent shuffles (full batches only)."""
        p1, p2 = torch.randperm(n, generator=gen_rng), torch.randperm(n, generator=gen_rng)
        for i in range(0, n - bs + 1, bs):
            yield p1[i:i + bs].to(device), p2[i:i + bs].to(device)

    def fetch(idx):
        return data[idx].float().div_(255)

    # Phase 1: the mask network alone (sparse and input-dependent masks).
    optM = torch.optim.Adam(netM.parameters(), s["lr_mask"], betas=(0.5, 0.9))
    me = int(s["mask_epochs"])
    schedM = torch.optim.lr_scheduler.MultiStepLR(optM, sorted({max(1, int(me * 0.4)), max(1, int(me * 0.8))}), 0.1)
    netM.train()
    for ep in range(me):
        for i1, i2 in batches():
            x1, x2 = fetch(i1), fetch(i2)
            m1, m2 = threshold(netM(x1)), threshold(netM(x2))
            norm = F.relu(m1 - s["mask_density"]).mean()
            loss = s["lambda_norm"] * norm + s["lambda_div"] * _diversity(x1, x2, m1, m2)
            optM.zero_grad(set_to_none=True)
            loss.backward()
            optM.step()
        schedM.step()
        if log:
            log(f"dynamic mask epoch {ep + 1}/{me}: loss {loss.item():.4f} norm {norm.item():.4f}")
    netM.eval().requires_grad_(False)

    # Phase 2: generator and helper classifier together (backdoor, cross and clean modes).
    epochs = int(s["epochs"])
    optC = torch.optim.SGD(netC.parameters(), s["lr"], momentum=0.9, weight_decay=5e-4)
    optG = torch.optim.Adam(netG.parameters(), s["lr_generator"], betas=(0.5, 0.9))
    schedC = torch.optim.lr_scheduler.CosineAnnealingLR(optC, max(1, epochs))
    schedG = torch.optim.lr_scheduler.CosineAnnealingLR(optG, max(1, epochs))
    n_bd, n_cross = max(1, int(s["p_attack"] * bs)), max(1, int(s["p_cross"] * bs))
    k = min(n_bd, n_cross)
    for ep in range(epochs):
        netC.train()
        netG.train()
        for i1, i2 in batches():
            x1, x2, y1 = fetch(i1), fetch(i2), y_all[i1]
            p1 = netG(x1[:n_bd])
            bd = x1[:n_bd] + (p1 - x1[:n_bd]) * threshold(netM(x1[:n_bd]))
            xo = x2[n_bd:n_bd + n_cross]
            p2 = netG(xo)
            cross = x1[n_bd:n_bd + n_cross] + (p2 - x1[n_bd:n_bd + n_cross]) * threshold(netM(xo))
            inputs = torch.cat([bd, cross, x1[n_bd + n_cross:]])
            targets = torch.cat([torch.full_like(y1[:n_bd], int(target)), y1[n_bd:]])
            ce = F.cross_entropy(netC(inputs), targets)
            div = _diversity(x1[:k], xo[:k], p1[:k], p2[:k])
            loss = ce + s["lambda_div"] * div
            optC.zero_grad(set_to_none=True)
            optG.zero_grad(set_to_none=True)
            loss.backward()
            optC.step()
            optG.step()
        schedC.step()
        schedG.step()
        if log:
            log(f"dynamic epoch {ep + 1}/{epochs}: ce {ce.item():.4f} diversity {div.item():.4f}")
    netG.eval().requires_grad_(False)
    netC.eval()

    stats = {}
    if test is not None:
        stats = _helper_stats(netC, netG, netM, *test, target, device)
        if log:
            log(f"dynamic helper: clean accuracy {stats['helper_clean_accuracy']:.3f}, "
                f"ASR {stats['helper_asr']:.3f}, mask mean {stats['mask_mean']:.4f}")
    return netG.cpu(), netM.cpu(), stats


def _helper_stats(netC, netG, netM, images, labels, target, device, limit: int = 1000) -> dict:
    """The helper classifier's clean accuracy and ASR (non-target images) on the first `limit`
    test images, and the mean mask value: how well the learned trigger works before poisoning."""
    import torch

    x = torch.from_numpy(np.asarray(images)[:limit]).to(device).float().div_(255)
    y = torch.as_tensor(np.asarray(labels)[:limit], device=device)
    with torch.no_grad():
        m = threshold(netM(x))
        bd = x + (netG(x) - x) * m
        acc = (netC(x).argmax(1) == y).float().mean().item()
        keep = y != target
        asr = (netC(bd[keep]).argmax(1) == target).float().mean().item() if keep.any() else math.nan
    return {"helper_clean_accuracy": acc, "helper_asr": asr, "mask_mean": m.mean().item()}


def initial_artifact(image_shape, width: int = 4, depth: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """An artifact holding the untrained (seeded) nets: a valid, input-aware but meaningless
    trigger, for contract tests that need a Dynamic attack without a learning run."""
    import torch

    c = int(image_shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        nets = {"gen": _build_net(c, c, width, depth), "mask": _build_net(c, 1, width, depth)}
    out = {f"{p}.{k}": v.numpy() for p, net in nets.items() for k, v in net.state_dict().items()}
    return {**out, "arch_width": np.int64(width), "arch_depth": np.int64(depth)}
