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
from .zoo import AUGMENTS, OPTIMIZERS, SCHEDULES


@OPTIMIZERS.register("adamw")
def _adamw(params, spec: dict, **kw) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **_lr(spec, kw), weight_decay=float(spec["weight_decay"]))


@OPTIMIZERS.register("adam")
def _adam(params, spec: dict, **kw) -> torch.optim.Optimizer:
    # Coupled L2 as torch's Adam does it (LfD trains with Adam and weight decay 0).
    return torch.optim.Adam(params, **_lr(spec, kw), weight_decay=float(spec["weight_decay"]))


@OPTIMIZERS.register("radam")
def _radam(params, spec: dict, **kw) -> torch.optim.Optimizer:
    # Narcissus's poison warm-up fine-tunes with RAdam.
    return torch.optim.RAdam(params, **_lr(spec, kw), weight_decay=float(spec["weight_decay"]))


@OPTIMIZERS.register("sgd")
def _sgd(params, spec: dict, **kw) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, **_lr(spec, kw), momentum=float(spec.get("momentum", 0.9)),
                           weight_decay=float(spec["weight_decay"]), nesterov=bool(spec.get("nesterov", False)))


def lr_schedule(opt: torch.optim.Optimizer, training: dict, epochs: int):
    """The learning-rate schedule, stepped once per epoch: `cosine` (the default) anneals to 0 over
    `epochs`; `constant`; `multistep` multiplies the rate by `gamma` at each epoch in `milestones`
    (CBD's code: SGD 0.1, x0.1 at epochs 20 and 70)."""
    kind = training.get("schedule", "cosine")
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(m) for m in training.get("milestones", [])],
                                                    gamma=float(training.get("gamma", 0.1)))
    raise ConfigError("schedule", kind, ", ".join(SCHEDULES))


def _lr(spec: dict, kw: dict) -> dict:
    """The config's learning rate unless the caller passes its own (a device tensor for a captured
    step), plus the caller's other constructor arguments (fused, capturable)."""
    return {"lr": float(spec["lr"]), **kw}


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


# How this process trains (setup_runtime sets it from the config's runtime settings).
_RUNTIME = {"cuda_graphs": True, "cpu_channels_last": False}


def channels_last(device: torch.device) -> bool:
    """Whether models and batches use the channels-last memory format: on CUDA always; on the CPU
    where the config's `cpu_channels_last: true` asks (about 1.7x faster for the small CNN on one
    core, with other rounding than the contiguous format, so off by default to keep CPU results
    as they were)."""
    return device.type == "cuda" or _RUNTIME["cpu_channels_last"]


def setup_runtime(runtime: dict) -> torch.device:
    torch.set_num_threads(int(runtime.get("threads", 1)))
    device = resolve_device(runtime.get("device", "auto"))
    _RUNTIME["cuda_graphs"] = bool(runtime.get("cuda_graphs", True))
    _RUNTIME["cpu_channels_last"] = bool(runtime.get("cpu_channels_last", False))
    if device.type == "cuda":
        # Every training batch has one shape: let cuDNN time its kernels once and keep the fastest.
        torch.backends.cudnn.benchmark = True
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


@dataclass(frozen=True)
class Augment:
    """A batch augmentation in two halves. `draw(n, gen, spec)` takes every random number a batch
    of n needs from a CPU generator, as per-example tensors, so an epoch's draws (made batch by batch
    at its start, in the same order as drawing per batch) concatenate and slice by batch and travel
    to the device in one copy; `apply(x, params, spec)` draws nothing, so a CUDA graph replays it."""

    draw: Callable[[int, torch.Generator, dict], tuple[torch.Tensor, ...]]
    apply: Callable[[torch.Tensor, tuple[torch.Tensor, ...], dict], torch.Tensor]

    def __call__(self, x: torch.Tensor, gen: torch.Generator, spec: dict) -> torch.Tensor:
        return self.apply(x, tuple(p.to(x.device) for p in self.draw(len(x), gen, spec)), spec)


AUGMENTS.register("none")(Augment(lambda n, gen, spec: (), lambda x, params, spec: x))


def _draw_crop_flip(n: int, gen: torch.Generator, spec: dict, pad: int = 4) -> tuple[torch.Tensor, ...]:
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    return oy, ox, torch.rand(n, generator=gen) < 0.5


def _crop_flip(x: torch.Tensor, params: tuple[torch.Tensor, ...], spec: dict, pad: int = 4,
               mode: str = "reflect") -> torch.Tensor:
    """Random crop from a padded image (pad 4; reflect as in the BaDLoss code) and horizontal flip,
    one gather for the batch."""
    oy, ox, flip = params
    n, c, h, w = x.shape
    xp = F.pad(x.float(), (pad, pad, pad, pad), mode=mode) if mode == "reflect" else F.pad(x.float(), (pad,) * 4)
    rows = (oy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (ox[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    x = xp.gather(3, cols).to(x.dtype)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


AUGMENTS.register("crop_flip")(Augment(_draw_crop_flip, _crop_flip))
# torchvision's RandomCrop(padding=4) + flip, as LfD trains.
AUGMENTS.register("crop_flip_zero")(Augment(_draw_crop_flip, lambda x, p, spec: _crop_flip(x, p, spec, mode="constant")))


def _draw_resized_crop(n: int, gen: torch.Generator, spec: dict) -> tuple[torch.Tensor, ...]:
    """RandomResizedCrop's box (scale range from the config, ratio 3/4..4/3) and a flip sign."""
    lo, hi = spec.get("crop_scale", (0.08, 1.0))
    area = torch.empty(n).uniform_(lo, hi, generator=gen)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    ratio = torch.exp(logr)
    sw = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
    sh = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sw)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sh)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    return sw * flip, tx, sh, ty


def _resized_crop(x: torch.Tensor, params: tuple[torch.Tensor, ...], spec: dict) -> torch.Tensor:
    """The drawn boxes resampled to the image size (one affine grid_sample, bilinear)."""
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = params
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


AUGMENTS.register("resized_crop_flip")(Augment(_draw_resized_crop, _resized_crop))


def _epoch_draws(augment: Augment, sizes: list[int], gen: torch.Generator, spec: dict,
                 device: torch.device) -> tuple[torch.Tensor, ...]:
    """Every batch's augmentation draws of one epoch, batch by batch (the generator's stream is
    the same as drawing before each batch), concatenated and copied to the device at once: no
    host-to-device copy, and so no wait for the device, inside the epoch."""
    per_batch = [augment.draw(size, gen, spec) for size in sizes]
    if not per_batch or not per_batch[0]:
        return ()
    cat = [torch.cat(parts) for parts in zip(*per_batch)]
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in cat)
    return tuple(cat)


# ---- the loop ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: nn.Module
    losses: np.ndarray | None  # (epochs_run, N) float32 per-example losses, when recorded
    train_loss: list[float]  # mean (clamped) training loss of each epoch
    wall_time_s: float
    images_per_s: float
    epochs_run: int
    graphed: bool = False  # full batches replayed a captured CUDA graph


def to_float(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 images to float in [0, 1] (channels-last memory on CUDA)."""
    x = x.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def gather_batch(images, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The uint8 rows `idx` of `images` (a tensor, an array or a DefenderImages) on `device`."""
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
    cl = channels_last(device)
    amp = amp and device.type == "cuda"
    labels = labels.to(device)
    rows = torch.arange(len(labels), device=device) if rows is None else rows.to(device)
    out = torch.empty(len(rows), dtype=torch.float32, device=device)
    for s in range(0, len(rows), batch_size):
        idx = rows[s:s + batch_size]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(to_float(gather_batch(images, idx, device), cl))
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
    cl = channels_last(device)
    preds = []
    for s in range(0, len(images), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(images)))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            preds.append(model(to_float(gather_batch(images, idx, device), cl)).argmax(1).cpu())
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


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images, device: torch.device, batch_size: int, cl: bool) -> bool:
    """Recompute every batch-norm layer's running mean and variance for the model's current weights:
    one forward pass in training mode over `images` in their order, without augmentation, the
    per-batch statistics averaged with equal weight ("precise BN"). The exponential averages
    kept during training trail the weights; where the weights still move fast, an eval-mode model
    then normalises with statistics of earlier weights. Returns whether the model has any."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return False
    was = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the pass's batches
    model.train()
    try:
        for s in range(0, len(images), batch_size):
            idx = torch.arange(s, min(s + batch_size, len(images)))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(to_float(gather_batch(images, idx, device), cl))
    finally:
        for m, mom in zip(norms, momenta):
            m.momentum = mom
        model.train(was)
    return True


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
        progress_every: float | None = 60.0, graphs: bool | None = None) -> TrainResult:
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
    critic) is per rank. One process (no torchrun) is the plain path above, unchanged.

    On CUDA, full batches replay a captured CUDA graph of the whole step (forward, per-example
    losses, backward, fused optimiser update) when `graphs` (default: the runtime's cuda_graphs)
    is on, the optimiser is in GRAPH_OPTIMIZERS and neither `step_loss`, `epoch_start` nor
    data-parallel processes are in use. Eager CUDA steps use the same fused optimiser, so both run
    the same kernels (bit-equal on an H200). The CPU path never uses graphs and stays bit-exact."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    epochs = int(training["epochs"])
    run = epochs if epochs_to_run is None else int(epochs_to_run)
    bs = int(training["batch_size"])
    clamp = float(training.get("loss_clamp", 100.0))
    augment = AUGMENTS.get(training.get("augment", "none"), "augment")
    cuda = device.type == "cuda"
    cl = channels_last(device)
    amp = cuda and training.get("precision", "bf16") == "bf16"
    recalibrate = bool(training.get("bn_recalibration", False))
    ddp = _process_group(device)
    opt_name = training.get("optimizer", "adamw")
    graphs = _RUNTIME["cuda_graphs"] if graphs is None else graphs
    # On CUDA the optimiser is always the fused one a graph can capture, so graphed and eager
    # steps run the same kernels.
    fused = cuda and opt_name in GRAPH_OPTIMIZERS
    graphed = (graphs and fused and ddp is None and step_loss is None and epoch_start is None
               and n // bs > GRAPH_WARMUP)

    if init_model is not None:
        import copy

        model = copy.deepcopy(init_model).to(device)
    else:
        model = build_model(training["model"], num_classes, images.shape[-1]).to(device)
    objective = batch_objective(training.get("objective", "ce"), float(training.get("objective_level", 0.5)))
    if cl:
        model = model.to(memory_format=torch.channels_last)
    if ddp is not None and cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = model  # the module itself; `model` is what the step calls (DDP's wrapper under torchrun)
    # A graph replays the optimiser with the learning rate it reads from the device, so the
    # schedule still acts; fused and capturable keep the whole update on the device.
    opt = OPTIMIZERS.get(opt_name, "optimizer")(
        model.parameters(), training,
        **({"lr": torch.tensor(float(training["lr"]), device=device), **GRAPH_OPTIMIZERS[opt_name]} if fused else {}))
    sched = lr_schedule(opt, training, epochs)
    if fused:  # the schedule's base rates as numbers, never aliases of the tensor it fills
        sched.base_lrs = [float(b) for b in sched.base_lrs]
        for g in opt.param_groups:
            g["initial_lr"] = float(g["initial_lr"])
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
    lr_now = _learning_rates(opt, device if fused else None)
    if ddp is not None:
        from torch.nn.parallel import DistributedDataParallel

        gpu = device.index if device.index is not None else torch.cuda.current_device() if cuda else None
        model = DistributedDataParallel(net, device_ids=[gpu] if cuda else None)
    # Written in place by every step, so a captured step keeps writing the same memory.
    ep_sum = torch.zeros((), device=device)
    rec = torch.zeros(n, dtype=torch.float32, device=device) if record == "train" else None

    def step(xb: torch.Tensor, idx: torch.Tensor, params: tuple, real: int, share: float = 1.0) -> None:
        """One optimiser step on a uint8 batch; `real` of its examples count, `share` scales the
        loss (data-parallel shards)."""
        xf = to_float(augment.apply(xb, params, training), cl)
        yb = y_dev[idx]
        # No autocast weight cache: a captured step must cast the weights it is replayed with.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            logits = model(xf)
        per = F.cross_entropy(logits.float(), yb, reduction="none")
        if rec is not None and real:
            rec[idx] = per.detach()
        if step_loss is not None:
            loss = step_loss(net, xf, yb, per, idx)
        elif w_dev is None:
            loss = objective(per.clamp(max=clamp))
        else:
            wb = w_dev[idx]
            capped = per.clamp(max=clamp) if ascent_clamp is None else torch.where(wb < 0, per.clamp(max=ascent_clamp), per.clamp(max=clamp))
            loss = (capped * wb).mean()
        opt.zero_grad(set_to_none=True)
        (loss if share == 1.0 else loss * share).backward()
        opt.step()
        ep_sum.add_(loss.detach() * real)

    graph = _StepGraph(step, bs) if graphed else None
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
        batches = [perm_dev[s:s + bs] for s in range(0, n, bs)]
        if ddp is not None:
            global_sizes = [len(b) for b in batches]
            batches, reals = zip(*(_shard(b, ddp) for b in batches))
        else:
            reals = [len(b) for b in batches]
        draws = _epoch_draws(augment, [len(b) for b in batches], aug_gen, training, device)
        ep_sum.zero_()
        if rec is not None and ddp is not None:
            rec.zero_()  # summed over the ranks, each filling its own examples
        offset = 0
        for b, (idx, real) in enumerate(zip(batches, reals)):
            params = tuple(t[offset:offset + len(idx)] for t in draws)
            offset += len(idx)
            xb = gather_batch(data, idx, device)
            idx = idx.to(device)
            if graph is not None and len(idx) == bs:
                graph(xb, idx, params)
            else:
                # DDP averages the ranks' gradients: weighting each by its share of the global batch
                # makes that the gradient of the mean over the whole batch.
                step(xb, idx, params, real, 1.0 if ddp is None else real * ddp.world / global_sizes[b])
            now = time.perf_counter()
            if now >= next_report:
                done = min((b + 1) * bs, n)
                log(f"epoch {epoch + 1}/{run}: batch {b + 1}/{n_batches}, {done / (now - t_ep):.0f} img/s")
                next_report = now + progress_every
        sched.step()
        lr_now()
        seen += n
        if ddp is not None:
            _sum_over_ranks(ep_sum)
            _sync_buffers(net)
        train_loss.append(float(ep_sum) / n)  # syncs the device: the pass's time is real from here
        t_pass = time.perf_counter() - t_ep
        if recalibrate and (record == "eval" or epoch == run - 1):
            recalibrate_batchnorm(net, data, device, bs, cl)
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
            log(f"epoch {epoch + 1}/{run} train_loss {train_loss[-1]:.4f} lr {float(sched.get_last_lr()[0]):.2e} "
                f"{n / t_pass if t_pass > 0 else float('nan'):.0f} img/s {format_duration(epoch_times[-1])} "
                f"ETA {format_duration(eta)}" + (" (checkpoint saved)" if checkpoint else "")
                + (" (CUDA graph)" if graph is not None and graph.graph is not None else ""))
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = before + time.perf_counter() - t0
    if ddp is not None:
        model = _plain_batchnorm(net)
    return TrainResult(model=model, losses=losses, train_loss=train_loss, wall_time_s=wall,
                       images_per_s=seen / wall if wall > 0 else float("nan"), epochs_run=run,
                       graphed=graph is not None and graph.graph is not None)


# ---- CUDA graphs ------------------------------------------------------------------------------

# Optimisers whose whole step can be captured (fused, learning rate read from the device), with
# the constructor arguments that make it so; the others train eagerly.
GRAPH_OPTIMIZERS = {"adamw": {"fused": True, "capturable": True}, "adam": {"fused": True, "capturable": True},
                    "sgd": {"fused": True}}
# Eager steps before the capture: real steps of the run that also create the optimiser state,
# pick cuDNN's kernels and settle the allocator, as a capture needs.
GRAPH_WARMUP = 3


class _StepGraph:
    """The training step of a full batch, captured once as a CUDA graph after GRAPH_WARMUP eager
    steps and replayed for every later full batch: one launch instead of a few hundred kernel
    launches from Python, and no host work the device waits for. The batch, its indices and its
    augmentation draws are copied into fixed buffers the graph reads; the model, optimiser state,
    learning rate, epoch loss sum and recorded losses live at fixed addresses the step updates in
    place. A partial last batch runs eagerly on the same tensors."""

    def __init__(self, step: Callable, batch_size: int):
        self.step, self.bs = step, batch_size
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warm = 0
        self.inputs: tuple[torch.Tensor, ...] = ()

    def __call__(self, xb: torch.Tensor, idx: torch.Tensor, params: tuple) -> None:
        if self.graph is not None:
            for buf, t in zip(self.inputs, (xb, idx, *params)):
                buf.copy_(t, non_blocking=True)
            self.graph.replay()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            if self.warm < GRAPH_WARMUP:
                self.step(xb, idx, params, self.bs)
                self.warm += 1
            else:
                self.inputs = tuple(t.clone() for t in (xb, idx, *params))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=side):
                    x, i, *p = self.inputs
                    self.step(x, i, tuple(p), self.bs)
                self.graph = graph
        torch.cuda.current_stream().wait_stream(side)
        if self.graph is not None:
            self.graph.replay()  # the capture recorded this batch's step without running it


def _learning_rates(opt: torch.optim.Optimizer, device: torch.device | None) -> Callable[[], None]:
    """Keep each group's learning rate a device tensor (a captured step reads it there) or a plain
    float (device None). Returns what to call after each scheduler step: a scheduler that assigns a
    float instead of filling the tensor is copied into the tensor the graph reads."""
    if device is None:
        for g in opt.param_groups:
            g["lr"] = float(g["lr"])
        return lambda: None
    tensors = []
    for g in opt.param_groups:
        lr = g["lr"]
        if not (isinstance(lr, torch.Tensor) and lr.device == device):
            g["lr"] = torch.tensor(float(lr), device=device)
        tensors.append(g["lr"])

    def keep():
        for g, t in zip(opt.param_groups, tensors):
            if g["lr"] is not t:
                t.fill_(float(g["lr"]))
                g["lr"] = t

    return keep


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
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log(f"ignoring unreadable checkpoint {path}: {first[:120]}")
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

    from .digest import JSON_DIGEST_KEY, tensors_digest

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {**meta, JSON_DIGEST_KEY: tensors_digest(state)}
    with atomic_path(path) as tmp:
        try:
            torch.save({"state_dict": state, "meta": meta}, tmp)
        except RuntimeError as e:  # torch reports a failed write (a full disk) as a RuntimeError
            raise OSError(str(e)) from None


def load_model(path, device: torch.device) -> tuple[nn.Module, dict]:
    from .errors import ArtifactError

    if not os.path.exists(path):
        raise ArtifactError(f"{path}: file not found")
    from .digest import JSON_DIGEST_KEY, changed, tensors_digest

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        model = build_model(meta["model"], meta["num_classes"], meta["image_size"])
        model.load_state_dict(blob["state_dict"])
    except Exception as e:  # noqa: BLE001 - whatever fails to load is not a usable model file
        raise ArtifactError(f"{path}: not a poisongrid model file or truncated ({str(e).splitlines()[0][:200]}); "
                            "delete it and rerun the stage that makes it") from None
    if meta.get(JSON_DIGEST_KEY) is not None and meta[JSON_DIGEST_KEY] != tensors_digest(blob["state_dict"]):
        raise changed(path, "its weights")
    return model.to(device), meta
