"""k-nearest-neighbour distances: the shared arithmetic of BaDLoss's detector and the adaptive
attack's surrogate detector."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import ConfigError


def knn_log_distance(x: np.ndarray, ref: np.ndarray, k: int, eps: float = 1e-8, chunk: int = 1024,
                     workers: int | None = None) -> np.ndarray:
    """log(eps + mean Euclidean distance to the k nearest rows of `ref`), for every row of `x`.

    Squared distances as |r|^2 - 2 x.r from one float32 GEMM per chunk (x gets a column of ones,
    the reference matrix a row of |r|^2), on data centred on the reference mean (centring keeps
    the cancellation error far below the distances). |x|^2 shifts a whole row alike, so it is
    added after the in-place partial sort, to the k selected entries only, and so are the square
    roots. Chunks of `chunk` rows keep the chunk x len(ref) float32 block in a core's L2 cache;
    they are spread over threads (BLAS and numpy's partition release the GIL), with BLAS itself
    held to one thread so the two levels of threading do not fight. Memory: chunk x len(ref)
    float32 per worker."""
    ref = np.asarray(ref, dtype=np.float32)
    if k > len(ref) or k < 1:
        raise ConfigError("k", k, f"an integer in [1, {len(ref)}] (the number of bona fide examples)")
    n, d = len(x), ref.shape[1]
    mu = ref.mean(0, dtype=np.float64).astype(np.float32)
    r = ref - mu
    rr = (r * r).sum(1)
    w = np.empty((d + 1, len(r)), dtype=np.float32)
    w[:d], w[d] = -2.0 * r.T, rr
    # Below float32 resolution of |x|^2 + |r|^2 the true distance is 0 (e.g. a bona fide example
    # against itself); the rounding residue would otherwise add ~1e-3.
    floor = np.float32(1e-6) * rr.max()
    out = np.empty(n, dtype=np.float64)

    def run(s: int) -> None:
        xb = np.empty((min(chunk, n - s), d + 1), dtype=np.float32)
        np.subtract(x[s:s + chunk], mu, out=xb[:, :d])
        xb[:, d] = 1.0
        xx = np.einsum("ij,ij->i", xb[:, :d], xb[:, :d])[:, None]
        d2 = xb @ w
        if k < len(r):
            d2.partition(k - 1, axis=1)
        near = d2[:, :k]
        near += xx
        near[near < np.float32(1e-6) * xx + floor] = 0.0
        np.sqrt(near, out=near)
        out[s:s + chunk] = np.log(near.sum(1, dtype=np.float64) / k + eps)

    starts = range(0, n, chunk)
    workers = min(workers or _cpus(), 8, len(starts))
    if workers > 1:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, starts))
    else:
        for s in starts:
            run(s)
    return out


def _cpus() -> int:
    """CPUs this process may run on (a scheduler's allotment, not the whole machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
