"""Narcissus (Zeng et al. 2022): a clean-label additive trigger optimised on a surrogate model."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import ConfigError
from .base import ATTACKS, Attack, LearnJob, _short

if TYPE_CHECKING:  # torch is imported lazily: config checks and poisoning do not need it
    import torch


@ATTACKS.register("narcissus")
class Narcissus(Attack):
    """Clean-label: x' = clip(x + trigger); boost (ASR, the reference's 'narcissus x2'):
    clip(x + 2 trigger). `trigger` is a float (C, H, W) array in [0,1] units bounded by `eps` in
    l-inf, produced by the `trigger` stage. Reference (BaDLoss, CIFAR-10 only): eps 16/255; the
    BaDLoss code loads a precomputed trigger file.

    The trigger stage follows the original code (ruoxi-jia-group/Narcissus, `narcissus_gen`):
    1. a surrogate `model` is trained `epochs` on the attacker's pool plus the target class;
    2. poison warm-up: it is fine-tuned `warmup_epochs` on the target-class images alone (RAdam,
       `warmup_lr`; the original: 5 epochs, RAdam lr 0.1);
    3. `rounds` rounds (the original: 1000), each one pass over a fresh permutation of the
       target-class images in batches of `batch_size` (the original: 350), each batch one RAdam
       step at `lr` (0.01) on the trigger (see `optimize_trigger`).

    `pool`: 'train' (default) is the target class plus `pool_fraction` of the other classes of the
    same training set, labelled with their own classes (a documented deviation: no public
    out-of-distribution set is available offline). A path (absolute or relative to the working
    directory) names the attacker's out-of-distribution set, as the original's Tiny-ImageNet: an
    .npz holding `images` (uint8 N,C,H,W, N,H,W,C or N,H,W) and integer `labels`, an .npz the
    `npz` dataset loader reads (its training split) or a folder the `folder` loader reads (its
    training split), resized to the dataset's image size. As in the original the surrogate then
    has one output per OOD class plus one for the target class (the last); all OOD images are
    used and `pool_fraction` is ignored.

    Deviations from the original code: the warm-up and the trigger both aim at the target
    class's own surrogate output (the original's warm-up and trigger loaders carry the CIFAR-10
    label, 2, which in its 201-way surrogate is an OOD class, not the target's output 200; the
    paper's text aims at the target class); the warm-up runs through the shared training loop,
    so its learning rate follows a cosine schedule over `warmup_epochs` where the original keeps
    it constant, and it augments as the dataset's training does; the surrogate trains with the
    dataset's optimiser and schedule (the original: SGD lr 0.1, momentum 0.9, wd 5e-4, cosine,
    200 epochs, batch 350)."""

    name = "narcissus"
    clean_label = True
    boostable = True
    defaults = {"eps": 16 / 255}
    # batch_size None: the dataset's; warmup_epochs may be 0 (no warm-up).
    learn_defaults = {"model": "resnet18", "epochs": 20, "pool": "train", "pool_fraction": 0.1, "warmup_epochs": 5,
                      "warmup_lr": 0.1, "rounds": 1000, "lr": 0.01, "batch_size": None}

    # Narcissus's code: a 200-epoch surrogate, 5 warm-up epochs, 1000 trigger rounds.
    reference_learn = {"epochs": 200, "warmup_epochs": 5, "rounds": 1000}
    reference_source = "Narcissus's code: 200 surrogate epochs, 1000 rounds"

    @classmethod
    def check_learn(cls, settings: dict, key: str, deep: bool = True) -> dict:
        if not isinstance(settings, dict):
            return super().check_learn(settings, key, deep)
        if "steps" in settings:  # the earlier setting: random minibatches instead of rounds
            raise ConfigError(f"{key}.steps", settings["steps"], "nothing: use rounds (each one pass over the target class)")
        special = {k: settings[k] for k in ("warmup_epochs", "batch_size", "pool") if k in settings}
        s = super().check_learn({k: v for k, v in settings.items() if k not in special}, key, deep)
        w = special.get("warmup_epochs", s["warmup_epochs"])
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"{key}.warmup_epochs", w, "a non-negative integer (0: no warm-up)")
        b = special.get("batch_size", s["batch_size"])
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ConfigError(f"{key}.batch_size", b, "a positive integer, or null for the dataset's batch size")
        p = special.get("pool", s["pool"])
        if not isinstance(p, str) or not p:
            raise ConfigError(f"{key}.pool", p, "'train' or the path of an out-of-distribution set (.npz or folder)")
        if deep:
            if p != "train" and not (Path(p).is_dir() or (Path(p).is_file() and p.endswith(".npz"))):
                raise ConfigError(f"{key}.pool", p, "'train' or an existing .npz file or folder (an out-of-distribution set)")
        return {**s, "warmup_epochs": w, "batch_size": b, "pool": p}

    @classmethod
    def learn_epochs(cls, settings: dict) -> float:
        """Surrogate epochs scaled by its pool's share of the set, plus the warm-up and the
        rounds, each a pass over the target class (taken as a tenth of the set)."""
        s = {**cls.learn_defaults, **settings}
        share = 0.1 + 0.9 * float(s["pool_fraction"]) if s["pool"] == "train" else 1.0
        return float(s["epochs"]) * share + 0.1 * (int(s["warmup_epochs"]) + int(s["rounds"]))

    @classmethod
    def learn(cls, job: LearnJob) -> dict[str, np.ndarray]:
        """Surrogate on the attacker's pool, warm-up on the target class, then the trigger rounds."""
        s = job.settings
        images, labels, num_classes, aim = _surrogate_pool(job)
        job.log(f"surrogate {s['model']} on {len(labels)} images ({num_classes} classes), target class {job.target}")
        model = job.fit(images, labels, s["model"], s["epochs"], num_classes=num_classes).model
        target_images = job.dataset.train.images[job.dataset.train.labels == job.target]
        bs = int(s["batch_size"] or job.training["batch_size"])
        if s["warmup_epochs"] > 0:
            job.log(f"poison warm-up: {s['warmup_epochs']} epochs on {len(target_images)} target-class images")
            model = job.fit(target_images, np.full(len(target_images), aim, np.int64), s["model"], s["warmup_epochs"],
                            num_classes=num_classes, init_model=model,
                            training={"optimizer": "radam", "lr": float(s["warmup_lr"]), "weight_decay": 0.0,
                                      "batch_size": bs}).model
        eps = float(job.params.get("eps", cls.defaults["eps"]))
        trig = optimize_trigger(model, target_images, aim, eps=eps, rounds=s["rounds"], lr=s["lr"], batch_size=bs,
                                seed=job.seed, device=job.device, log=job.log)
        job.log(f"trigger done: l-inf {np.abs(trig).max() * 255:.1f}/255")
        return {"trigger": trig.astype(np.float32), "surrogate_pool": np.int64(len(labels))}

    def _setup(self) -> None:
        eps = self._number("eps", 0.0, 1.0)
        if self.artifact is None:
            self.delta = None
            return
        t = self._artifact("trigger")
        t = np.asarray(t, dtype=np.float32)
        if t.shape != self.image_shape:
            raise ConfigError(self._key("trigger"), _short(t), f"an array of shape {self.image_shape}")
        if not np.isfinite(t).all() or np.abs(t).max() > eps + 1e-6:
            raise ConfigError(self._key("trigger"), f"l-inf {np.abs(t).max():.4g}", f"values within [-eps, eps], eps = {eps:.4g}")
        self.delta = np.clip(t, -eps, eps) * np.float32(255)

    def _apply(self, x: np.ndarray, boost: bool) -> np.ndarray:
        if self.delta is None:
            self._artifact("trigger")
        return x + (2 * self.delta if boost else self.delta)


def _surrogate_pool(job: LearnJob) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(images, labels, surrogate classes, the target's surrogate label) of what the attacker holds."""
    s, train = job.settings, job.dataset.train
    tgt = np.flatnonzero(train.labels == job.target)
    if s["pool"] == "train":
        others = np.flatnonzero(train.labels != job.target)
        pick = job.rng(3).choice(others, size=max(1, int(len(others) * s["pool_fraction"])), replace=False)
        pool = np.sort(np.concatenate([tgt, pick]))
        return train.images[pool], train.labels[pool], job.dataset.num_classes, int(job.target)
    ood, ood_labels = load_pool(s["pool"], job.dataset.image_shape[-1])
    # The original's layout: OOD classes 0..K-1, the target class K.
    classes, y = np.unique(ood_labels, return_inverse=True)
    k = len(classes)
    images = np.concatenate([ood, train.images[tgt]])
    labels = np.concatenate([y.astype(np.int64), np.full(len(tgt), k, np.int64)])
    return images, labels, k + 1, k


def load_pool(path: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An out-of-distribution set as uint8 (N, 3, size, size) images and int64 labels: an .npz
    with `images` and `labels`, an .npz of the `npz` loader or a folder of the `folder` loader
    (their training splits)."""
    from PIL import Image

    from ..data import load_dataset, npz_images, resize_square

    p = Path(path)
    key = "attacks.narcissus.learn.pool"
    if p.is_dir():
        split = load_dataset("folder", data_dir=p, image_size=size, root="").train
        return split.images, split.labels
    if not (p.is_file() and p.suffix == ".npz"):
        raise ConfigError(key, path, "an existing .npz file or folder (an out-of-distribution set)")
    with np.load(p, allow_pickle=False) as z:
        if "images" not in z.files:
            split = load_dataset("npz", data_dir=p.parent, image_size=size, path=p.name).train
            return split.images, split.labels
        if "labels" not in z.files:
            raise ConfigError(key, path, f"an .npz with 'images' and 'labels' (it holds {sorted(z.files)})")
        x, y = npz_images(p, "images", z["images"]), z["labels"]
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
        raise ConfigError(key, path, f"integer 'labels' of shape ({len(x)},), one per image (got {y.dtype} {y.shape})")
    if x.shape[2:] != (size, size):
        x = np.stack([resize_square(Image.fromarray(im.transpose(1, 2, 0)), size) for im in x])
    return x, y.astype(np.int64)


def _crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Per image: a random crop of the zero-padded image (torchvision's RandomCrop(padding=pad))
    and a random horizontal flip, as the original's target-class loader augments."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    xp = F.pad(x, (pad,) * 4)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (ox[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    out = xp.gather(2, rows).gather(3, cols)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)


def optimize_trigger(surrogate: torch.nn.Module, images: np.ndarray, target: int, *, eps: float = 16 / 255,
                     rounds: int = 1000, lr: float = 0.01, batch_size: int = 350, seed: int = 0,
                     device: str | torch.device = "cpu", augment: bool = True,
                     log: Callable[[str], None] | None = None,
                     on_batch: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Optimise a Narcissus trigger: delta (C, H, W) in [0,1] units, |delta| <= eps.

    One round is one pass over a fresh permutation of the target-class `images` (uint8,
    (N, C, H, W)) in batches of `batch_size`; each batch is augmented as the original's loader
    does (per image a random crop with H/8 px of zero padding, 4 at 32 px, and a horizontal flip),
    the trigger is added, clamp(x + clamp(delta, -eps, eps), 0, 1), and one RAdam step at `lr`
    lowers the surrogate's cross-entropy toward `target`. As in the original the trigger variable
    itself is not projected: it is clamped to the l-inf ball where it is used (a coordinate past
    the bound gets no gradient), and the rounds stop early when a round's last batch gives the
    trigger no gradient at all. The surrogate runs in training mode as in the original (its
    batch-norm layers use batch statistics) with frozen parameters; its parameters, buffers and
    mode are restored afterwards. Starts from delta = 0; all randomness comes from a generator
    seeded with `seed`, so CPU runs are deterministic. `on_batch(round, indices)` sees each
    batch's image indices; `log` gets the mean loss of about every 10% of the rounds."""
    import time

    import torch
    import torch.nn.functional as F

    x_all = np.asarray(images)
    if x_all.dtype != np.uint8 or x_all.ndim != 4 or len(x_all) == 0:
        raise ValueError(f"images must be a non-empty uint8 (N, C, H, W) array, got {x_all.dtype} {x_all.shape}")
    if not 0 < eps <= 1:
        raise ConfigError("attacks.narcissus.eps", eps, "a number in (0, 1]")
    device = torch.device(device)
    n, c, h, w = x_all.shape
    data = torch.from_numpy(x_all).to(device)  # uint8 on device: 4x smaller than float
    gen = torch.Generator().manual_seed(int(seed))
    pad = max(1, round(min(h, w) / 8))
    delta = torch.zeros((c, h, w), device=device, requires_grad=True)
    opt = torch.optim.RAdam([delta], lr=lr)

    was_training = surrogate.training
    flags = [p.requires_grad for p in surrogate.parameters()]
    buffers = {k: v.detach().clone() for k, v in surrogate.named_buffers()}  # batch-norm statistics move in train mode
    surrogate.train()
    for p in surrogate.parameters():
        p.requires_grad_(False)
    try:
        t0 = time.perf_counter()
        every = max(1, rounds // 10)
        with torch.enable_grad():
            for r in range(rounds):
                loss_sum = torch.zeros((), device=device)
                perm = torch.randperm(n, generator=gen)
                for i in range(0, n, batch_size):
                    idx = perm[i:i + batch_size]
                    if on_batch is not None:
                        on_batch(r, idx.numpy())
                    x = data[idx.to(device)].float().div_(255)
                    if augment:
                        x = _crop_flip(x, pad, gen)
                    x = (x + delta.clamp(-eps, eps)).clamp(0, 1)
                    target_t = torch.full((len(idx),), int(target), device=device, dtype=torch.long)
                    loss = F.cross_entropy(surrogate(x), target_t)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum += loss.detach() * len(idx)
                if log and ((r + 1) % every == 0 or r + 1 == rounds):
                    from ..training import format_duration

                    log(f"narcissus round {r + 1}/{rounds} loss {loss_sum.item() / n:.4f} "
                        f"elapsed {format_duration(time.perf_counter() - t0)}")
                if delta.grad is None or not delta.grad.any().item():  # the original's stop: nothing left to move
                    break
    finally:
        for p, f in zip(surrogate.parameters(), flags):
            p.requires_grad_(f)
        with torch.no_grad():
            for k, v in surrogate.named_buffers():
                v.copy_(buffers[k])
        surrogate.train(was_training)
    return delta.detach().clamp(-eps, eps).cpu().numpy().astype(np.float32)
