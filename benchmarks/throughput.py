"""Training throughput of poisongrid's loop (`training.fit`) on synthetic data, one setting per run.

    python benchmarks/throughput.py --model resnet50 --image-size 32 --batch-size 128 --n-train 25600
    python benchmarks/throughput.py --model resnet18 --batch-size 512 --graphs off
    python benchmarks/throughput.py --model resnet50 --image-size 224 --augment resized_crop_flip --n-train 6400
    python benchmarks/throughput.py --processes 4 ...     # four jobs side by side on one device

Trains with the papers' optimiser (AdamW lr 1e-3, wd 1e-4, cosine) and per-example loss recording
(`--record train`: the training pass's own losses; `eval`: an extra eval-mode pass per epoch, as
BaDLoss pretraining does). Prints the device, then one JSON line per process: images/s over the
steady epochs (all but the first, which pays cuDNN's autotuning, the graph capture and the
allocator's growth), the first epoch's time, peak device memory. With `--processes N` the N jobs
wait for each other after their first epoch and start their steady epochs together; the line
`aggregate` divides all their steady images by the common window (first start to last end): what a
GPU shared by N jobs of a grid delivers. Works on an older poisongrid too (PYTHONPATH at its src), without `--graphs`."""
from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import os
import time


def job(args, rank: int, queue, barrier) -> None:
    import numpy as np
    import torch

    from poisongrid import training

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rng = np.random.default_rng(rank)
    x = rng.integers(0, 256, size=(args.n_train, 3, args.image_size, args.image_size), dtype=np.uint8)
    y = rng.integers(0, args.classes, args.n_train)
    tr = dict(model=args.model, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=1e-3,
              weight_decay=1e-4, loss_clamp=100, augment=args.augment, precision=args.precision,
              crop_scale=(0.08, 1.0))
    # An older loop without graphs is measured as it is.
    current = "graphs" in inspect.signature(training.fit).parameters
    kw = {"graphs": args.graphs == "on"} if current else {}
    ends: list[float] = []
    synced: list[float] = []

    def log(msg: str) -> None:
        if msg.startswith("epoch ") and " train_loss " in msg:
            ends.append(time.time())
            if len(ends) == 1:
                barrier.wait()  # every job's steady epochs start together
                synced.append(time.time())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    res = training.fit(tr, x, y, args.classes, seed=rank, device=device, record=None if args.record == "off" else args.record,
                       log=log, progress_every=None, **kw)
    steady = args.n_train * (len(ends) - 1) / (ends[-1] - synced[0]) if len(ends) > 1 else float("nan")
    queue.put(("done", {
        "rank": rank, "loop": "current" if current else "older", "steady_img_s": round(steady, 1), "overall_img_s": round(res.images_per_s, 1),
        "first_epoch_s": round(ends[0] - t0, 2), "steady_start": synced[0], "steady_end": ends[-1],
        "steady_images": args.n_train * (len(ends) - 1), "graphed": getattr(res, "graphed", False),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "final_train_loss": round(res.train_loss[-1], 4)}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=25600)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--augment", default="crop_flip")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--record", default="train", choices=["off", "train", "eval"])
    ap.add_argument("--graphs", default="on", choices=["on", "off"])
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)

    import torch

    from poisongrid import training

    name = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "CPU"
    print(f"# device: {name}; torch {torch.__version__}; poisongrid loop from {os.path.dirname(training.__file__)}")
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(args.processes)
    procs = [ctx.Process(target=job, args=(args, r, queue, barrier)) for r in range(args.processes)]
    for p in procs:
        p.start()
    rows = []
    while len(rows) < args.processes:
        kind, val = queue.get()
        if kind == "done":
            rows.append(val)
    for p in procs:
        p.join()
    setting = {k: getattr(args, k) for k in ("label", "model", "image_size", "batch_size", "n_train", "epochs",
                                             "optimizer", "augment", "precision", "record", "graphs", "processes")}
    for r in sorted(rows, key=lambda r: r["rank"]):
        print(json.dumps({**setting, **{k: v for k, v in r.items() if not k.startswith("steady_")}, "steady_img_s": r["steady_img_s"]}))
    if args.processes > 1:
        window = max(r["steady_end"] for r in rows) - min(r["steady_start"] for r in rows)
        print(json.dumps({**setting, "aggregate_steady_img_s": round(sum(r["steady_images"] for r in rows) / window, 1),
                          "window_s": round(window, 2)}))


if __name__ == "__main__":
    main()
