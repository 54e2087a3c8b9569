"""Neural Cleanse (Wang et al., S&P 2019) as BaDLoss adapts it: reverse-engineer a trigger per
class, flag classes whose trigger is anomalously small, and score examples by how strongly they
activate the neurons those triggers raise."""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import DETECTORS, Detector, ScoreWriter

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal distribution's std
NO_FLAG_OFFSET = 1.0  # fallback scores sit at least this far below 0 (nothing is flagged)


def lower_median(x) -> float:
    """The lower of the two middle values for an even count (torch.median, as the reference)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    return float(x[(len(x) - 1) // 2])


def mad_anomaly_index(norms: np.ndarray) -> np.ndarray:
    """|norm - median| / (1.4826 * median |norm - median|) per class, lower medians (the
    reference's torch.median). With a zero MAD, classes at the median get 0 and the others
    infinity."""
    norms = np.asarray(norms, dtype=np.float64)
    dev = np.abs(norms - lower_median(norms))
    mad = MAD_CONSISTENCY * lower_median(dev)
    if mad > 0:
        return dev / mad
    return np.where(dev > 0, np.inf, 0.0)


def flag_classes(norms: np.ndarray, threshold: float) -> np.ndarray:
    """Classes whose trigger is anomalously SMALL: anomaly index >= threshold and norm <= median."""
    norms = np.asarray(norms, dtype=np.float64)
    a = mad_anomaly_index(norms)
    return np.flatnonzero((a >= threshold) & (norms <= lower_median(norms)))


def probe_threshold(s: np.ndarray, bona: np.ndarray, fpr: float) -> float:
    """The u-th largest bona fide score, u = 1 + int(n_bona * fpr): about a fraction fpr of the
    bona fide examples lie strictly above it."""
    probes = np.sort(s[bona])
    u = min(1 + int(len(probes) * fpr), len(probes))
    return float(probes[-u])


class _Counter:
    """Images pushed through the model, for the cost record."""

    def __init__(self):
        self.fwd_bwd = 0
        self.fwd = 0


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def reverse_triggers(model, x: torch.Tensor, classes: list[int], p: dict, epochs: int, gen: torch.Generator,
                     batch_size: int, counter: _Counter) -> dict:
    """Optimise a (C,H,W) mask and pattern per target class on the uint8 images `x` (on the model's
    device). Classes go in groups of `class_batch`: one forward of the group's stamped copies of a
    batch; the summed loss keeps the classes' Adam updates independent (Adam is elementwise)."""
    masks, patterns, stats = {}, {}, {}
    for g in range(0, len(classes), p["class_batch"]):
        group = classes[g:g + p["class_batch"]]
        m, t, st = _reverse_group(model, x, group, p, epochs, gen, batch_size, counter)
        for j, c in enumerate(group):
            masks[c], patterns[c], stats[c] = m[j], t[j], st[j]
    return {"masks": masks, "patterns": patterns, "stats": stats}


def _reverse_group(model, x, group, p, epochs, gen, batch_size, counter):
    device = x.device
    k, n = len(group), len(x)
    shape = (k, *x.shape[1:])
    mask = torch.rand(shape, generator=gen).to(device).requires_grad_(True)
    pattern = torch.rand(shape, generator=gen).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask, pattern], lr=p["lr"])
    lam = torch.full((k,), float(p["init_cost"]), device=device)
    target = torch.tensor(group, device=device)
    hits = torch.zeros(k, device=device)
    for _ in range(epochs):
        hits.zero_()
        order = torch.randperm(n, generator=gen).to(device)
        for s in range(0, n, batch_size):
            xb = x[order[s:s + batch_size]].float().div_(255.0)
            b = len(xb)
            # (k, b, C, H, W): every class's stamp on the same batch.
            xs = xb.unsqueeze(0) * (1 - mask.unsqueeze(1)) + (mask * pattern).unsqueeze(1)
            with _autocast(device):
                out = model(xs.flatten(0, 1)).float().view(k, b, -1)
            ce = F.cross_entropy(out.flatten(0, 1), target.repeat_interleave(b), reduction="none").view(k, b).mean(1)
            loss = (ce + lam * mask.abs().flatten(1).sum(1)).sum()
            hits += (out.argmax(2) == target[:, None]).sum(1).detach()  # before the step, as the reference counts
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                mask.clamp_(0, 1)
                pattern.clamp_(0, 1)
            counter.fwd_bwd += k * b
        # Adaptive L1 cost, once per epoch: relax it while the trigger misses the target.
        below = hits < p["attack_success"] * n
        above = hits > p["attack_success"] * n
        lam = torch.where(below, lam / p["cost_multiplier"], torch.where(above, lam * p["cost_multiplier"], lam))
    m, t = mask.detach(), pattern.detach()
    st = [{"norm": float(m[j].abs().sum()), "attack_success": float(hits[j]) / n, "final_cost": float(lam[j]),
           "mask_centroid": _centroid(m[j]), "mask_peak": _peak(m[j])} for j in range(k)]
    return m, t, st


def _centroid(mask: torch.Tensor) -> list[float]:
    """(row, column) of the mask's mass, channels summed: where the reversed trigger sits."""
    w = mask.float().sum(0).cpu().numpy().astype(np.float64)
    tot = w.sum()
    if tot <= 0:
        return [float("nan"), float("nan")]
    r, c = np.indices(w.shape)
    return [float((w * r).sum() / tot), float((w * c).sum() / tot)]


def _peak(mask: torch.Tensor, k: int = 3) -> list[int]:
    """(row, column) centre of the k x k window holding the most mask mass."""
    w = mask.float().sum(0)[None, None]
    box = F.avg_pool2d(w, k, stride=1, padding=k // 2, count_include_pad=True)[0, 0]
    r, c = divmod(int(box.argmax()), box.shape[1])
    return [r, c]


@torch.no_grad()
def penultimate(model, images, device, batch_size: int, counter: _Counter, mask=None, pattern=None) -> np.ndarray:
    """Penultimate features (the last linear layer's input) of uint8 images, optionally stamped
    with a reversed trigger, float32 (N, D)."""
    from ..models import penultimate_module
    from ..training import gather_batch

    grabbed: list[torch.Tensor] = []
    hook = penultimate_module(model).register_forward_hook(lambda mod, inp, out: grabbed.append(inp[0].float().cpu()))
    try:
        for s in range(0, len(images), batch_size):
            xb = gather_batch(images, torch.arange(s, min(s + batch_size, len(images))), device).float().div_(255.0)
            if mask is not None:
                xb = xb * (1 - mask) + mask * pattern
            with _autocast(device):
                model(xb)
            counter.fwd += len(xb)
    finally:
        hook.remove()
    return torch.cat(grabbed).numpy()


def top_neurons(clean: np.ndarray, stamped: np.ndarray, frac: float) -> np.ndarray:
    """The max(1, int(frac * D)) neurons whose mean activation the trigger raises most (signed)."""
    diff = (stamped.astype(np.float64) - clean.astype(np.float64)).mean(0)
    k = max(1, int(clean.shape[1] * frac))
    return np.argsort(-diff, kind="stable")[:k]


@DETECTORS.register("neural_cleanse")
class NeuralCleanse(Detector):
    """Neural Cleanse as BaDLoss uses it as a baseline (the paper's App. I.2).

    Per class c: a 3-channel mask m and pattern t in pixel space ([0,1], projected by clamping,
    both initialised U[0,1)) minimise CE(f(x(1-m) + m t), c) + lam |m|_1 with Adam (lr `lr`,
    default PyTorch's 1e-3) for `epochs` passes over the search images, one step per batch.
    lam starts at `init_cost` and is divided (multiplied) by `cost_multiplier` after each pass in
    which fewer (more) than `attack_success` of the images were sent to c. The last iterate's
    |m|_1 is the class's norm. Anomaly index = |norm - median| / (1.4826 MAD); classes with index
    >= `anomaly_threshold` and norm <= median are flagged. For a flagged class, its neurons are
    the top int(`neuron_frac` * D) penultimate units (at least 1) by mean activation increase
    from stamping the search images; s_c(x) = mean of those units on the UNSTAMPED image; its
    threshold is the u-th largest s_c over the bona fide examples, u = 1 + int(n_bona * fpr_c),
    fpr_c = `fpr` / (number flagged).

    Score (higher = more suspicious): max over flagged classes of s_c(x) - threshold_c, so the
    reference's removal set (s_c > threshold_c for some c) is exactly score > 0. When no class is
    flagged the reference removes nothing; here the minimum-norm class (the one with the highest
    anomaly index among those below the median) still ranks the examples, shifted so that every
    score is <= -1: nothing is above 0, but detection AUROC stays defined.

    The search runs over the whole training set (`search_images: 0`, the reference's budget: 15
    epochs of about 391 Adam steps per class on CIFAR-10 at batch 128, 105 on GTSRB at 256).
    Options that cut the budget, each recorded in the scores' metadata (`budget`) and marked in
    the tables:
    - `search_images` > 0: a seeded sample of that many training images, shared by all classes,
      so the cost is epochs x classes x sample. Neurons are ranked on the same sample. At Adam's
      1e-3 a mask entry moves at most about 1e-3 per step, so a tenth of the steps leaves the
      masks far from sparse and the anomaly index loses its range.
    - `max_classes` > 0: every class gets a short pre-screen search (`prescreen_epochs`), and
      only the `max_classes` smallest-norm classes the full search; the anomaly index then mixes
      full-search norms (searched classes) with pre-screen norms (the rest), which biases the
      searched classes towards smaller norms, i.e. towards being flagged.

    Deviations from the reference: thresholds use the bona fide examples (the reference's
    indexing quirk effectively uses ~250 random training examples). Model weights are frozen
    during the search (same result, cheaper); on CUDA forwards run in bfloat16 autocast.
    `class_batch` > 1 optimises several classes at once on the same image batches (each class's
    update is the same as alone; only the batch order is shared).
    """

    type = "neural_cleanse"
    needs = ("weights", "images")
    default_model = "attacked"
    gpu = True
    cost_epochs = 150.0  # 15 passes x 10 classes of fwd+bwd over the training set
    min_bona_fide = 1
    params = {"epochs": 15, "search_images": 0, "batch_size": 0, "lr": 1e-3, "init_cost": 1.0,
              "cost_multiplier": 2.0, "attack_success": 0.99, "anomaly_threshold": 2.0, "neuron_frac": 0.01,
              "fpr": 0.05, "max_classes": 0, "prescreen_epochs": 1, "class_batch": 1}

    @classmethod
    def epochs(cls, det: dict, data: dict) -> float:
        # Forward+backward passes over the search sample, per searched class, plus the pre-screen.
        v = {**cls.params, **det}
        n = data["n_train"] or 50000
        frac = min(1.0, v["search_images"] / n) if v["search_images"] else 1.0
        k = data["num_classes"]
        full = min(k, v["max_classes"]) if v["max_classes"] else k
        pre = k * v["prescreen_epochs"] if v["max_classes"] else 0
        return (full * v["epochs"] + pre) * frac + 2

    @classmethod
    def check(cls, det: dict, key: str, cfg: dict, bona) -> None:
        super().check(det, key, cfg, bona)
        v = {k: det.get(k, d) for k, d in cls.params.items()}
        for k in ("epochs", "prescreen_epochs", "class_batch"):
            cls.positive(f"{key}.{k}", v[k], integer=True)
        for k in ("search_images", "batch_size", "max_classes"):
            if v[k] != 0:
                cls.positive(f"{key}.{k}", v[k], integer=True)
        for k in ("lr", "init_cost", "anomaly_threshold"):
            cls.positive(f"{key}.{k}", v[k])
        for k in ("attack_success", "neuron_frac", "fpr"):
            cls.positive(f"{key}.{k}", v[k], upper=1.0)
        if v["cost_multiplier"] <= 1:
            raise ConfigError(f"{key}.cost_multiplier", v["cost_multiplier"], "a number > 1")

    def score(self, out_path) -> dict:
        view, p = self.view, self.p
        t0 = time.perf_counter()
        device, model = view.device, view.model()
        images, bona = view.images, view.bona_fide
        n, k_cls = len(images), view.num_classes
        if not bona.any():
            raise ConfigError("bona_fide.n_clean", 0, "at least 1: neural_cleanse thresholds on the bona fide examples")
        bs = int(p["batch_size"] or view.training.get("batch_size", 128))
        counter = _Counter()
        grad = [q.requires_grad for q in model.parameters()]
        model.requires_grad_(False)  # only the mask and pattern are optimised
        try:
            sample = self._sample(n)
            x = torch.from_numpy(np.ascontiguousarray(images[sample])).to(device)
            norms, searched, prescreen, rev = self._search(model, x, k_cls, bs, counter)
        finally:
            for q, g in zip(model.parameters(), grad):
                q.requires_grad_(g)
        t_search = time.perf_counter() - t0
        flagged = [int(c) for c in flag_classes(norms, p["anomaly_threshold"])]
        rank = flagged or [int(np.argmin(norms))]
        for c in rank:
            if c not in rev["masks"]:  # a pre-screen-only class (max_classes): search it in full now
                more = reverse_triggers(model, x, [c], p, p["epochs"], view.generator(3, c), bs, counter)
                for key in rev:
                    rev[key][c] = more[key][c]
        clean = penultimate(model, images, device, bs, counter)
        clean_sample = clean[sample]
        per_class, best = {}, np.full(n, -np.inf)
        fpr_c = p["fpr"] / max(len(flagged), 1)
        for c in rank:
            stamped = penultimate(model, x, device, bs, counter, rev["masks"][c], rev["patterns"][c])
            neurons = top_neurons(clean_sample, stamped, p["neuron_frac"])
            s = clean[:, neurons].astype(np.float64).mean(1)
            thr = probe_threshold(s, bona, fpr_c)
            best = np.maximum(best, s - thr)
            per_class[str(c)] = {"neurons": neurons.tolist(), "threshold": thr, "n_above": int((s > thr).sum()),
                                 "n_bona_fide_above": int((s[bona] > thr).sum())}
        score = best if flagged else best - max(best.max(), 0.0) - NO_FLAG_OFFSET
        a = mad_anomaly_index(norms)
        meta = {"cell": self.cell, "detector": self.type, "params": p, "flagged_classes": flagged,
                "ranking_classes": rank, "n_flagged_examples": int((score > 0).sum()),
                "norms": norms.tolist(), "anomaly_index": [None if math.isinf(v) else float(v) for v in a],
                "searched_classes": searched, "prescreen_norms": prescreen, "per_class": per_class,
                "search": {str(c): rev["stats"][c] for c in sorted(rev["stats"])},
                "n_search_images": int(len(sample)), "n_bona_fide": int(bona.sum()), "batch_size": bs,
                "budget": self.budget(n, k_cls),
                "cost": {"search_wall_s": t_search, "total_wall_s": time.perf_counter() - t0,
                         "images_fwd_bwd": counter.fwd_bwd, "images_fwd": counter.fwd,
                         "epochs_fwd_bwd": counter.fwd_bwd / n, "epochs_fwd": counter.fwd / n}}
        with ScoreWriter(out_path, meta, self.view) as w:
            w.write(view.index, score)
        return meta

    def budget(self, n: int, k_cls: int) -> str | None:
        """How the search's budget falls short of the reference's, in words (None: it does not)."""
        p, notes = self.p, []
        if p["search_images"] and p["search_images"] < n:
            notes.append(f"mask search on {p['search_images']:,} of {n:,} training images")
        if p["max_classes"] and p["max_classes"] < k_cls:
            notes.append(f"full search for {p['max_classes']} of {k_cls} classes")
        if p["epochs"] < self.params["epochs"]:
            notes.append(f"{p['epochs']} search epochs (reference {self.params['epochs']})")
        return "; ".join(notes) or None

    def _sample(self, n: int) -> np.ndarray:
        """Sorted indices of the search images: all of them, or a seeded sample."""
        m = self.p["search_images"]
        if not m or m >= n:
            return np.arange(n)
        g = self.view.generator(1)
        return np.sort(torch.randperm(n, generator=g)[:m].numpy())

    def _search(self, model, x, k_cls: int, bs: int, counter: _Counter):
        """Norm of every class: full searches for all classes, or a pre-screen of all and full
        searches for the `max_classes` smallest."""
        p, view = self.p, self.view
        classes = list(range(k_cls))
        if not p["max_classes"] or p["max_classes"] >= k_cls:
            rev = reverse_triggers(model, x, classes, p, p["epochs"], view.generator(2), bs, counter)
            return np.array([rev["stats"][c]["norm"] for c in classes]), classes, None, rev
        pre = reverse_triggers(model, x, classes, p, p["prescreen_epochs"], view.generator(4), bs, counter)
        pre_norms = np.array([pre["stats"][c]["norm"] for c in classes])
        searched = sorted(int(c) for c in np.argsort(pre_norms, kind="stable")[:p["max_classes"]])
        rev = reverse_triggers(model, x, searched, p, p["epochs"], view.generator(2), bs, counter)
        norms = pre_norms.copy()
        for c in searched:
            norms[c] = rev["stats"][c]["norm"]
        return norms, searched, pre_norms.tolist(), rev
