"""The one training loop: pretraining, retraining, surrogates. It records each example's loss
per epoch when asked, augments whole batches on the training device, and is deterministic on CPU."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .models import build_model
from .zoo import AUGMENTS, OPTIMIZERS


@OPTIMIZERS.register("adamw")
def _adamw(params, spec: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=float(spec["lr"]), weight_decay=float(spec["weight_decay"]))


@OPTIMIZERS.register("adam")
def _adam(params, spec: dict) -> torch.optim.Optimizer:
    # Coupled L2 as torch's Adam does it (LfD trains with Adam and weight decay 0).
    return torch.optim.Adam(params, lr=float(spec["lr"]), weight_decay=float(spec["weight_decay"]))


@OPTIMIZERS.register("radam")
def _radam(params, spec: dict) -> torch.optim.Optimizer:
    # Narcissus's poison warm-up fine-tunes with RAdam.
    return torch.optim.RAdam(params, lr=float(spec["lr"]), weight_decay=float(spec["weight_decay"]))


@OPTIMIZERS.register("sgd")
def _sgd(params, spec: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=float(spec["lr"]), momentum=float(spec.get("momentum", 0.9)),
                           weight_decay=float(spec["weight_decay"]))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if os.environ.get("SLURM_JOB_ID"):
            # A cluster job without a GPU is a configuration error, not days of silent CPU training.
            raise ConfigError("device", "auto", f"a GPU in SLURM job {os.environ['SLURM_JOB_ID']} (cluster.gpus_per_job >= 1 "
                              "and a GPU partition), or device: cpu to train on the CPU deliberately")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "'cpu' or 'auto' on a machine without a CUDA GPU")
    return torch.device(name)


def setup_runtime(runtime: dict) -> torch.device:
    torch.set_num_threads(int(runtime.get("threads", 1)))
    device = resolve_device(runtime.get("device", "auto"))
    rank = world()
    if rank is not None and device.type == "cuda":
        # Under torchrun each process trains on its own GPU of the node.
        torch.cuda.set_device(rank.local)
        device = torch.device("cuda", rank.local)
    return device


# ---- data parallelism (processes started by torchrun) -----------------------------------------


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local: int


def world() -> Rank | None:
    """This process's place among the data-parallel processes torchrun started (WORLD_SIZE > 1);
    None when it trains alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    rank = int(os.environ["RANK"])
    return Rank(rank, size, int(os.environ.get("LOCAL_RANK", rank)))


def is_main() -> bool:
    """Whether this process writes outputs and logs (rank 0, or the only process)."""
    r = world()
    return r is None or r.rank == 0


def processes() -> int:
    """How many data-parallel processes train together (1 without torchrun)."""
    r = world()
    return 1 if r is None else r.world


def _process_group(device: torch.device) -> Rank | None:
    r = world()
    if r is None:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        import atexit

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return r


def _rank_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _shard(batch: torch.Tensor, r: Rank) -> tuple[torch.Tensor, int]:
    """This rank's slice of a global batch and how many real examples it holds. A rank left
    without one (a last batch smaller than the world) runs a weight-0 copy of the first example, so
    every rank still takes part in the gradient all-reduce."""
    mine = batch[r.rank::r.world]
    return (mine, len(mine)) if len(mine) else (batch[:1], 0)


def _sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) to every rank, so all hold one model."""
    import torch.distributed as dist

    for b in module.buffers():
        dist.broadcast(b, 0)


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def _plain_batchnorm(module: nn.Module) -> nn.Module:
    """SyncBatchNorm layers back to BatchNorm2d (same parameters and statistics), so the returned
    model runs without a process group."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.weight, bn.bias = child.weight, child.bias
            bn.running_mean, bn.running_var, bn.num_batches_tracked = child.running_mean, child.running_var, child.num_batches_tracked
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            _plain_batchnorm(child)
    return module


# ---- batch augmentations (uint8 batch in, uint8 batch out, on the batch's device) -----------------


@AUGMENTS.register("none")
def _no_aug(x: torch.Tensor, gen: torch.Generator, spec: dict) -> torch.Tensor:
    return x


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mask = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


@AUGMENTS.register("crop_flip")
def _crop_flip(x: torch.Tensor, gen: torch.Generator, spec: dict, pad: int = 4, mode: str = "reflect") -> torch.Tensor:
    """Random crop from a padded image (pad 4; reflect as in the BaDLoss code) and horizontal flip,
    one gather for the batch."""
    n, c, h, w = x.shape
    xp = F.pad(x.float(), (pad, pad, pad, pad), mode=mode) if mode == "reflect" else F.pad(x.float(), (pad,) * 4)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (ox[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return _flip(xp.gather(3, cols).to(x.dtype), gen)


@AUGMENTS.register("crop_flip_zero")
def _crop_flip_zero(x: torch.Tensor, gen: torch.Generator, spec: dict) -> torch.Tensor:
    """Random crop with 4 px of zero padding + flip (torchvision's RandomCrop(padding=4), as LfD trains)."""
    return _crop_flip(x, gen, spec, mode="constant")


@AUGMENTS.register("resized_crop_flip")
def _resized_crop_flip(x: torch.Tensor, gen: torch.Generator, spec: dict) -> torch.Tensor:
    """RandomResizedCrop (scale range from the config, ratio 3/4..4/3) + flip via one affine grid_sample."""
    n = x.shape[0]
    lo, hi = spec.get("crop_scale", (0.08, 1.0))
    area = torch.empty(n).uniform_(lo, hi, generator=gen)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = torch.exp(logr)
    sw = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
    sh = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sw)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sh)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sw * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sh, ty
    theta = theta.to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


# ---- the loop ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: nn.Module
    losses: np.ndarray | None  # (epochs_run, N) float32 per-example losses, when recorded
    train_loss: list[float]  # mean (clamped) training loss of each epoch
    wall_time_s: float
    images_per_s: float
    epochs_run: int


def _to_float(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _batch(images, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[idx.to(images.device)].to(device, non_blocking=True)
    # numpy (possibly memory-mapped): gather in sorted order for locality, then restore the order.
    idx = idx.cpu()
    order = idx.argsort()
    rows = np.ascontiguousarray(images[np.asarray(idx[order])])
    out = torch.empty_like(torch.from_numpy(rows))
    out[order] = torch.from_numpy(rows)
    return out.to(device, non_blocking=True)


@torch.no_grad()
def per_example_loss(model: nn.Module, images, labels: torch.Tensor, device: torch.device,
                     batch_size: int = 1024, amp: bool = True, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Unclamped cross-entropy of every example (or of `rows`, in their order), eval mode, no
    augmentation (float32, on CPU)."""
    model.eval()
    cl = device.type == "cuda"
    amp = amp and cl
    labels = labels.to(device)
    rows = torch.arange(len(labels), device=device) if rows is None else rows.to(device)
    out = torch.empty(len(rows), dtype=torch.float32, device=device)
    for s in range(0, len(rows), batch_size):
        idx = rows[s:s + batch_size]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(_to_float(_batch(images, idx, device), cl))
        out[s:s + len(idx)] = F.cross_entropy(logits.float(), labels[idx], reduction="none")
    return out.cpu()


def _all_losses(model: nn.Module, images, labels: torch.Tensor, device: torch.device, amp: bool,
                r: Rank | None) -> np.ndarray:
    """per_example_loss of every example; data-parallel, each rank evaluates every world-th one."""
    if r is None:
        return per_example_loss(model, images, labels, device, amp=amp).numpy()
    rows = torch.arange(r.rank, len(labels), r.world)
    full = torch.zeros(len(labels), dtype=torch.float32, device=device)
    full[rows.to(device)] = per_example_loss(model, images, labels, device, amp=amp, rows=rows).to(device)
    return _sum_over_ranks(full).cpu().numpy()  # x + 0.0 is exact: each example is one rank's


@torch.no_grad()
def predict(model: nn.Module, images, device: torch.device, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    cl = device.type == "cuda"
    preds = []
    for s in range(0, len(images), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(images)))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cl):
            preds.append(model(_to_float(_batch(images, idx, device), cl)).argmax(1).cpu())
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def penultimate_features(model: nn.Module, images, device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """The input of each example's last linear layer (eval mode, no augmentation), float32 (N, D)."""
    from .models import penultimate_module

    grabbed: list[torch.Tensor] = []
    hook = penultimate_module(model).register_forward_hook(lambda m, inp, out: grabbed.append(inp[0].float().cpu()))
    try:
        predict(model, images, device, batch_size)
    finally:
        hook.remove()
    return torch.cat(grabbed).numpy() if grabbed else np.zeros((0, 0), dtype=np.float32)


def as_tensor_data(images, device: torch.device, max_bytes: int = 8 << 30):
    """Keep the uint8 training set on the device when it fits; else leave it (memory-mapped or a
    lazy overlay of the poisoned rows) on the host and gather each batch."""
    if isinstance(images, torch.Tensor):
        return images
    if images.nbytes <= max_bytes:
        arr = images.materialize() if hasattr(images, "materialize") else np.ascontiguousarray(images)
        return torch.from_numpy(arr).to(device)
    return images


OBJECTIVES = ("ce", "flooding", "flooding_example", "lga", "lga_example")


def batch_objective(name: str, level: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss of a batch from its per-example cross-entropies l_i (already clamped).

    ce: mean(l). flooding: |m - b| + b on the batch mean m = mean(l) (Ishida et al. 2020; ABL's
    own code); flooding_example: mean(|l_i - b| + b), each example floods on its own (ABL as the
    BaDLoss code adapts it). lga: sign(m - g) * m on the batch mean (ABL's local gradient ascent as
    its code and BackdoorBox apply it); lga_example: mean(sign(l_i - g) * l_i), the per-example form
    the ABL paper writes. Once a loss falls below g (b) it is pushed back up, so easy examples stay
    easy and the backdoored ones, learned fastest, end with the lowest losses."""
    if name == "ce":
        return lambda per: per.mean()
    if name == "flooding":
        return lambda per: (per.mean() - level).abs() + level
    if name == "flooding_example":
        return lambda per: ((per - level).abs() + level).mean()
    if name == "lga":
        return lambda per: torch.sign(per.mean() - level) * per.mean()
    if name == "lga_example":
        return lambda per: (torch.sign(per - level) * per).mean()
    raise ConfigError("objective", name, ", ".join(OBJECTIVES))


def fit(training: dict, images, labels: np.ndarray, num_classes: int, *, seed: int, device: torch.device,
        epochs_to_run: int | None = None, record: str | None = None, weights: np.ndarray | None = None,
        ascent_clamp: float | None = None, checkpoint: str | None = None, init_model: nn.Module | None = None,
        step_loss: Callable | None = None, epoch_start: Callable | None = None,
        fingerprint: str = "", log: Callable[[str], None] | None = None,
        progress_every: float | None = 60.0) -> TrainResult:
    """Train a fresh model from `training` (model, epochs, batch_size, optimizer, lr, weight_decay,
    loss_clamp, augment). The cosine schedule spans `training['epochs']`; `epochs_to_run` stops early
    (BaDLoss pretraining). `record`: None, 'eval' (extra eval-mode pass after every epoch, paper),
    'train' (the training pass's own per-example losses, no extra cost) or 'final' (one eval-mode
    pass after the last epoch).

    `weights` (one per example, nonzero): the step minimises mean(w * loss) over the batch; a
    negative weight is gradient ascent on that example, its loss clamped at `ascent_clamp` so the
    ascent stops there instead of inflating the logits without bound. All weights 1 gives exactly
    the plain step (x * 1.0 is exact).

    With `checkpoint`, the full state (model, optimiser, schedule, RNG, losses so far) is saved
    atomically after every epoch, and a run restarted with the same `fingerprint` (a digest of
    everything the result depends on) resumes after the last saved epoch, ending with the same
    result as an uninterrupted run (bit-equal on CPU). A checkpoint with another fingerprint is
    ignored. The caller deletes the checkpoint once its own output is written.

    With `log`, every epoch logs its loss, images/s, wall time and an ETA for the rest of the run;
    an epoch running longer than `progress_every` seconds also logs the batches done and images/s
    every `progress_every` seconds (None: never), so a long job's log shows it is alive.

    `init_model`: start from a copy of these weights (fine-tuning) instead of a fresh model.
    `training['objective']` (see batch_objective; level `objective_level`) maps the batch's
    per-example losses to what is minimised (without `weights` or `step_loss` only). `step_loss(model, x, y, per_example_ce, idx)` (x: the float batch in [0, 1]) replaces the whole batch
    loss (a remedy's own objective, e.g. CBD's); `idx` indexes `images`. It may hold its own
    parameters and optimiser; it is not checkpointed, so a remedy using one resumes its epoch-level
    state itself or runs without a checkpoint. `epoch_start(epoch, model)` is called before each
    epoch's pass (also the first one after a resume), so such an objective can attach hooks to the
    model and follow its own per-epoch schedule.

    Data-parallel (started by torchrun, WORLD_SIZE > 1; nccl on CUDA, gloo on CPU): every rank
    draws the same permutation from `seed` and takes every world-th example of each global batch,
    so a step still averages over `batch_size` examples (each rank's loss is scaled by its share, so
    the all-reduced gradient is the full batch's for a per-example mean; flooding/lga on the batch
    mean and a `step_loss` act on each rank's share). Augmentation and dropout draw from per-rank
    generators seeded by (seed, epoch, rank). Batch norm is SyncBatchNorm on CUDA (statistics over
    the global batch); on CPU each rank normalises its own share. Recorded losses are gathered so
    every rank returns every example once per epoch; only rank 0 writes the checkpoint, which
    resumes only a run with the same number of processes. A `step_loss`'s own state (CBD's
    critic) is per rank. One process (no torchrun) is the plain path above, unchanged."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    epochs = int(training["epochs"])
    run = epochs if epochs_to_run is None else int(epochs_to_run)
    bs = int(training["batch_size"])
    clamp = float(training.get("loss_clamp", 100.0))
    augment = AUGMENTS.get(training.get("augment", "none"), "augment")
    cl = device.type == "cuda"
    amp = cl and training.get("precision", "bf16") == "bf16"
    ddp = _process_group(device)

    if init_model is not None:
        import copy

        model = copy.deepcopy(init_model).to(device)
    else:
        model = build_model(training["model"], num_classes, images.shape[-1]).to(device)
    objective = batch_objective(training.get("objective", "ce"), float(training.get("objective_level", 0.5)))
    if cl:
        model = model.to(memory_format=torch.channels_last)
    if ddp is not None and cl:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model  # the module itself; `model` is what the step calls (DDP's wrapper under torchrun)
    opt = OPTIMIZERS.get(training.get("optimizer", "adamw"), "optimizer")(model.parameters(), training)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    data = as_tensor_data(images, device)
    y = torch.as_tensor(np.array(labels), dtype=torch.int64)
    y_dev = y.to(device)
    w_dev = None
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float32)
        if weights.shape != (n,) or not np.isfinite(weights).all() or (weights == 0).any():
            raise ValueError("weights: one finite nonzero weight per example (drop zero-weight examples first)")
        w_dev = torch.from_numpy(weights).to(device)
        if (weights < 0).any() and ascent_clamp is None:
            raise ValueError("negative weights need ascent_clamp")
    losses = np.empty((1 if record == "final" else run, n), dtype=np.float32) if record else None
    train_loss: list[float] = []
    seen, start, before = 0, 0, 0.0
    ident = {"fingerprint": fingerprint, "epochs_to_run": run, "record": record or "", "n": n, "seed": seed}
    if ddp is not None:
        ident["world"] = ddp.world
    state = _load_checkpoint(checkpoint, ident, log) if checkpoint else None
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        start, seen, before = int(state["epoch"]) + 1, int(state["seen"]), float(state["wall"])
        train_loss = [float(v) for v in state["train_loss"]]
        if record in ("eval", "train"):
            losses[:start] = state["losses"].numpy()
        if log:
            log(f"resumed from checkpoint {checkpoint}: epochs 1-{start} done, continuing at epoch {start + 1}/{run}")
    if ddp is not None:
        from torch.nn.parallel import DistributedDataParallel

        gpu = device.index if device.index is not None else torch.cuda.current_device() if cl else None
        model = DistributedDataParallel(net, device_ids=[gpu] if cl else None)
    aug_gen = gen
    t0 = time.perf_counter()
    n_batches = -(-n // bs)
    epoch_times: list[float] = []
    for epoch in range(start, run):
        t_ep = time.perf_counter()
        # One clock read per batch; on CUDA it measures the host's progress (kernels run
        # asynchronously), which is close enough for a heartbeat and costs no device sync.
        next_report = t_ep + progress_every if (log and progress_every is not None) else math.inf
        model.train()
        if epoch_start is not None:
            epoch_start(epoch, net)
        perm = torch.randperm(n, generator=gen)
        if ddp is not None:
            # Fresh per-rank draws each epoch: a resumed run needs no other rank's generator state.
            aug_gen = torch.Generator().manual_seed(_rank_seed(seed, epoch, ddp.rank))
            torch.manual_seed(_rank_seed(seed, epoch, ddp.rank) + 1)
        # One host-to-device copy of the order per epoch, not one per batch.
        perm_dev = perm.to(device) if isinstance(data, torch.Tensor) else perm
        ep_sum = torch.zeros((), device=device)
        rec = torch.empty(n, dtype=torch.float32, device=device) if record == "train" else None
        if rec is not None and ddp is not None:
            rec.zero_()  # summed over the ranks, each filling its own examples
        for s in range(0, n, bs):
            idx = perm_dev[s:s + bs]
            real = len(idx)
            if ddp is not None:
                global_size = real
                idx, real = _shard(idx, ddp)
            xb = augment(_batch(data, idx, device), aug_gen, training)
            yb = y_dev[idx.to(device)]
            xf = _to_float(xb, cl)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(xf)
            per = F.cross_entropy(logits.float(), yb, reduction="none")
            if rec is not None and real:
                rec[idx.to(device)] = per.detach()
            if step_loss is not None:
                loss = step_loss(net, xf, yb, per, idx)
            elif w_dev is None:
                loss = objective(per.clamp(max=clamp))
            else:
                wb = w_dev[idx.to(device)]
                capped = per.clamp(max=clamp) if ascent_clamp is None else torch.where(wb < 0, per.clamp(max=ascent_clamp), per.clamp(max=clamp))
                loss = (capped * wb).mean()
            opt.zero_grad(set_to_none=True)
            if ddp is None:
                loss.backward()
            else:
                # DDP averages the ranks' gradients: weighting each by its share of the global batch
                # makes that the gradient of the mean over the whole batch.
                (loss * (real * ddp.world / global_size)).backward()
            opt.step()
            ep_sum += loss.detach() * real
            now = time.perf_counter()
            if now >= next_report:
                done = min(s + bs, n)
                log(f"epoch {epoch + 1}/{run}: batch {s // bs + 1}/{n_batches}, {done / (now - t_ep):.0f} img/s")
                next_report = now + progress_every
        sched.step()
        seen += n
        if ddp is not None:
            _sum_over_ranks(ep_sum)
            _sync_buffers(net)
        train_loss.append(float(ep_sum) / n)  # syncs the device: the pass's time is real from here
        t_pass = time.perf_counter() - t_ep
        if record == "eval":
            losses[epoch] = _all_losses(net, data, y, device, amp, ddp)
        elif record == "train":
            losses[epoch] = (rec if ddp is None else _sum_over_ranks(rec)).cpu().numpy()
        elif record == "final" and epoch == run - 1:
            losses[0] = _all_losses(net, data, y, device, amp, ddp)
        if checkpoint and is_main():
            _save_checkpoint(checkpoint, {
                **ident, "epoch": epoch, "seen": seen, "wall": before + time.perf_counter() - t0,
                "model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "train_loss": train_loss,
                "losses": torch.from_numpy(losses[:epoch + 1].copy()) if record in ("eval", "train") else torch.zeros(0)})
        epoch_times.append(time.perf_counter() - t_ep)
        if log:
            eta = (run - epoch - 1) * sum(epoch_times) / len(epoch_times)
            log(f"epoch {epoch + 1}/{run} train_loss {train_loss[-1]:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{n / t_pass if t_pass > 0 else float('nan'):.0f} img/s {format_duration(epoch_times[-1])} "
                f"ETA {format_duration(eta)}" + (" (checkpoint saved)" if checkpoint else ""))
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = before + time.perf_counter() - t0
    if ddp is not None:
        model = _plain_batchnorm(net)
    return TrainResult(model=model, losses=losses, train_loss=train_loss, wall_time_s=wall,
                       images_per_s=seen / wall if wall > 0 else float("nan"), epochs_run=run)


def format_duration(seconds: float) -> str:
    """12.3s, 3m12s, 2h05m: short enough for a log line."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _save_checkpoint(path: str, state: dict) -> None:
    """Written beside and renamed over the previous checkpoint, so a failed write (a full disk)
    leaves that one usable; the error names the path."""
    import errno

    from .io import atomic_path

    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except (RuntimeError, OSError) as e:
        text = str(e)
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text or "file write failed" in text
        code = errno.ENOSPC if full else (getattr(e, "errno", None) or errno.EIO)
        raise OSError(code, f"{os.strerror(code)} (writing the training checkpoint)", path) from None


def _load_checkpoint(path: str, ident: dict, log) -> dict | None:
    """The saved state if it belongs to this very run; None (and say why) otherwise."""
    if not os.path.exists(path):
        return None
    try:
        # weights_only: a checkpoint is data, never code to unpickle.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is simply not resumed from
        if log:
            log(f"ignoring unreadable checkpoint {path}: {e}")
        return None
    if not isinstance(state, dict) or any(state.get(k) != v for k, v in ident.items()):
        if log:
            log(f"ignoring checkpoint {path}: it was made from other inputs or settings")
        return None
    return state


def remove_checkpoint(path: str | None) -> None:
    if path and os.path.exists(path):
        os.unlink(path)


def save_model(path, model: nn.Module, meta: dict) -> None:
    from .io import atomic_path

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, "meta": meta}, tmp)


def load_model(path, device: torch.device) -> tuple[nn.Module, dict]:
    from .errors import ArtifactError

    if not os.path.exists(path):
        raise ArtifactError(f"{path}: file not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        model = build_model(meta["model"], meta["num_classes"], meta["image_size"])
        model.load_state_dict(blob["state_dict"])
    except Exception as e:  # noqa: BLE001 - whatever fails to load is not a usable model file
        raise ArtifactError(f"{path}: not a poisongrid model file or truncated ({str(e).splitlines()[0][:200]}); "
                            "delete it and rerun the stage that makes it") from None
    return model.to(device), meta
