"""What the content digests cost on the largest artifacts: a trajectories file of N examples x T
recorded epochs (float32 losses), written with its per-column digests and read back (whole, and
streamed in batches as the scorers read it) with and without checking them.

    python benchmarks/digests.py --examples 1000000 --epochs 30 --repeat 3

Prints the median wall time of each step and the digest's share of it."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)

    import pyarrow.parquet as pq

    from poisongrid import digest, trajectories

    losses = np.random.default_rng(0).gamma(2.0, 0.5, (a.epochs, a.examples)).astype(np.float32)
    meta = {"cell": {}, "model_name": "m", "model": "smallcnn", "epochs_run": a.epochs, "epochs_recorded": a.epochs,
            "accepted_epochs": list(range(a.epochs)), "n_examples": a.examples, "record": "train", "wall_time_s": 0.0}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trajectories.parquet"
        write = _median(lambda: trajectories.write(path, losses, meta), a.repeat)
        table = pq.read_table(path)
        hashing = _median(lambda: digest.table_digests(table), a.repeat)
        read = _median(lambda: trajectories.read(path), a.repeat)
        raw = _median(lambda: pq.read_table(path), a.repeat)
        stream = _median(lambda: sum(len(i) for i, _ in trajectories.iter_batches(path)), a.repeat)
        size = path.stat().st_size
    gb = losses.nbytes / 1e9
    print(f"trajectories {a.examples:,} x {a.epochs} float32 ({gb:.2f} GB in memory, {size / 1e9:.2f} GB on disk)")
    print(f"  digest of every column      {hashing:6.2f} s  ({gb / hashing:.2f} GB/s)")
    print(f"  write (with digests)        {write:6.2f} s  digest share {hashing / write:5.1%}")
    print(f"  read, checked               {read:6.2f} s  (Parquet decode alone {raw:.2f} s)")
    print(f"  streamed read, checked      {stream:6.2f} s")


if __name__ == "__main__":
    main()
