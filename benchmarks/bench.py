"""Print poisongrid's performance figures side by side, on this machine.

    python benchmarks/bench.py                     # all sections, CPU-sized
    python benchmarks/bench.py --device cuda --model resnet18 --n-train 50000 --batch-size 512
    python benchmarks/bench.py --only scoring --rows 1000000

Sections: trainer (images/s of the training loop with per-example loss recording against a bare
hand-written PyTorch loop on the same model, data and batch size), scoring (BaDLoss scores of
`--rows` trajectories against 250 bona fide ones, time and peak memory against scikit-learn's
brute-force NearestNeighbors, plus the streaming path from a Parquet file), parquet (size, write
and read time of the trajectory file under several encodings)."""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from poisongrid import trajectories
from poisongrid.detectors import knn_log_distance
from poisongrid.models import build_model
from poisongrid.training import _to_float, fit, per_example_loss


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        self.base, self.peak, self._stop = rss_mb(), rss_mb(), False
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def mb(self) -> float:
        return self.peak - self.base


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- trainer ----------------------------------------------------------------------------------


def bare_loop(model_name, x_u8, y, num_classes, epochs, bs, device, record, channels_last, bf16):
    """What a researcher would write by hand: same model, AdamW, cosine, batches from a device tensor."""
    torch.manual_seed(0)
    model = build_model(model_name, num_classes, x_u8.shape[-1]).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    n = len(y)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, device=device)
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            xb = _to_float(x_u8[idx], channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(xb)
            loss = F.cross_entropy(out.float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if record:
            per_example_loss(model, x_u8, y.cpu(), device)
    sync(device)
    return n * epochs / (time.perf_counter() - t0)


def bench_trainer(args, device):
    print(f"\n## trainer — {args.model}, {args.n_train} images {args.image_size}px, batch {args.batch_size}, "
          f"{args.epochs} epochs, device {device}")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(args.n_train, 3, args.image_size, args.image_size), dtype=np.uint8)
    y = rng.integers(0, 10, args.n_train)
    xt = torch.from_numpy(x).to(device)
    yt = torch.from_numpy(y).to(device)
    cuda = device.type == "cuda"
    tr = dict(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, weight_decay=1e-4,
              loss_clamp=100, augment="none")
    # Warm-up (cudnn autotune, allocator) so neither side pays it.
    bare_loop(args.model, xt, yt, 10, 1, args.batch_size, device, False, cuda, cuda)
    rows = []
    for record in (None, "train", "eval"):
        # Alternate the two loops and keep each one's median, so clock drift hits both alike.
        bare, ours = [], []
        for _ in range(args.repeats):
            bare.append(bare_loop(args.model, xt, yt, 10, args.epochs, args.batch_size, device, record == "eval", cuda, cuda))
            ours.append(fit(tr, x, y, 10, seed=0, device=device, record=record).images_per_s)
        rows.append((record or "off", float(np.median(bare)), float(np.median(ours))))
    print(f"(median of {args.repeats} alternating runs each)")
    print("| loss recording | bare loop img/s | poisongrid img/s | overhead |")
    print("|---|---|---|---|")
    for rec, bare, ours in rows:
        print(f"| {rec} | {bare:,.0f} | {ours:,.0f} | {100 * (bare / ours - 1):+.1f}% |")
    if cuda:
        print("\nCUDA precision / layout (bare loop, no recording):")
        for cl, bf in ((False, False), (True, False), (False, True), (True, True)):
            ips = bare_loop(args.model, xt, yt, 10, args.epochs, args.batch_size, device, False, cl, bf)
            print(f"  channels_last={cl!s:5} bf16={bf!s:5}: {ips:,.0f} img/s")
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


# ---- scoring ----------------------------------------------------------------------------------


def bench_scoring(args):
    print(f"\n## scoring — {args.rows:,} trajectories x {args.epochs_traj} epochs against 250 bona fide, k=50")
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 0.5, size=(args.rows, args.epochs_traj)).astype(np.float32)
    ref = x[rng.choice(args.rows, 250, replace=False)]
    gc.collect()
    with PeakRSS() as m:
        t0 = time.perf_counter()
        ours = knn_log_distance(x, ref, 50)
        t_ours = time.perf_counter() - t0
    print(f"poisongrid knn_log_distance: {t_ours:.2f} s, peak +{m.mb:.0f} MB")
    from sklearn.neighbors import NearestNeighbors

    gc.collect()
    with PeakRSS() as m2:
        t0 = time.perf_counter()
        nn = NearestNeighbors(n_neighbors=50, algorithm="brute").fit(ref)
        dist, _ = nn.kneighbors(x)
        sk = np.log(dist.mean(1) + 1e-8)
        t_sk = time.perf_counter() - t0
    print(f"sklearn NearestNeighbors(brute): {t_sk:.2f} s, peak +{m2.mb:.0f} MB")
    print(f"speed-up {t_sk / t_ours:.1f}x; max |difference| {np.abs(ours - sk).max():.2e}")
    return x


def bench_parquet_and_stream(args, x):
    print(f"\n## parquet — trajectory file of {len(x):,} rows x {x.shape[1]} float32 epochs")
    tmp = Path(tempfile.mkdtemp())
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"index": pa.array(np.arange(len(x), dtype=np.int64))}
    for e in range(x.shape[1]):
        cols[trajectories.column(e)] = pa.array(x[:, e])
    table = pa.table(cols)
    names = [trajectories.column(e) for e in range(x.shape[1])]
    variants = {
        "zstd + byte_stream_split, no dict (used)": dict(compression="zstd", use_dictionary=False, use_byte_stream_split=names),
        "zstd, no dict": dict(compression="zstd", use_dictionary=False),
        "zstd, dict (pyarrow default encodings)": dict(compression="zstd"),
        "snappy (pyarrow default)": dict(compression="snappy"),
        "uncompressed": dict(compression="none", use_dictionary=False),
    }
    print("| encoding | size MB | write s | read s |")
    print("|---|---|---|---|")
    for label, kw in variants.items():
        p = tmp / "t.parquet"
        t0 = time.perf_counter()
        pq.write_table(table, p, row_group_size=1 << 20, **kw)
        tw = time.perf_counter() - t0
        t0 = time.perf_counter()
        pq.read_table(p)
        tr = time.perf_counter() - t0
        print(f"| {label} | {p.stat().st_size / 1e6:.1f} | {tw:.2f} | {tr:.2f} |")
    # Streaming: score straight from the file in row blocks; memory bounded by the block size.
    real = tmp / "traj.parquet"
    trajectories.write(real, x.T.copy(), {"epochs_recorded": x.shape[1], "accepted_epochs": list(range(x.shape[1])),
                                          "skipped_epochs": [], "n_examples": len(x)})
    ref = x[:250]
    del table, cols
    gc.collect()
    with PeakRSS() as m:
        t0 = time.perf_counter()
        n = 0
        for idx, t in trajectories.iter_batches(real, batch_rows=1 << 17):
            knn_log_distance(t, ref, 50)
            n += len(idx)
        ts = time.perf_counter() - t0
    print(f"\nstreaming score from Parquet (blocks of 131072 rows): {n:,} rows in {ts:.2f} s, peak +{m.mb:.0f} MB "
          f"(the trajectories alone are {x.nbytes / 1e6:.0f} MB in memory)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["trainer", "scoring", "parquet"], nargs="*")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--n-train", type=int, default=4096)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--epochs-traj", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    only = set(args.only or ["trainer", "scoring", "parquet"])
    print(f"# poisongrid benchmarks — {sys.platform}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, threads {args.threads}")
    if "trainer" in only:
        bench_trainer(args, device)
    x = None
    if "scoring" in only:
        x = bench_scoring(args)
    if "parquet" in only:
        if x is None:
            x = np.random.default_rng(0).gamma(2.0, 0.5, size=(args.rows, args.epochs_traj)).astype(np.float32)
        bench_parquet_and_stream(args, x)


if __name__ == "__main__":
    main()
