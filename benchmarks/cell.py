"""Run one grid cell's stages in-process on a chosen device and print what each took.

    python benchmarks/cell.py --config configs/demo.yaml --dataset digits --scenario multi --device cuda

A quick way to check a device end to end (CUDA: bf16 autocast, channels-last) without Snakemake;
outputs go to a temporary folder unless --results is given."""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from poisongrid import config
from poisongrid.jobs import cell_jobs, run_job


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--scenario", default="multi")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--defenses", nargs="*", default=["none", "badloss", "lfd"])
    ap.add_argument("--results")
    args = ap.parse_args(argv)
    cfg = config.load(args.config, {"device": args.device})
    res = args.results or tempfile.mkdtemp(prefix="poisongrid-cell-")
    timings = {}
    for stage, cell in cell_jobs(cfg, args.dataset, args.scenario, args.seed, args.defenses):
        name = ":".join([stage] + [str(cell[k]) for k in ("attack", "model", "detector", "defense") if k in cell])
        t0 = time.perf_counter()
        out, _, _ = run_job(cfg, stage, res, **cell)
        timings[name] = round(time.perf_counter() - t0, 2)
        if stage == "pretrain":
            print(f"{name}: {out['images_per_s']:.0f} img/s on {out['device']}, skipped epochs {out['skipped_epochs']}")
        if stage == "evaluate":
            print(f"{cell['defense']}: clean acc {out['clean_accuracy']:.4f}, mean ASR {out['mean_asr']:.4f} "
                  f"(boosted {out['mean_asr_boosted']:.4f}), train {out['train_images_per_s']:.0f} img/s on {out['device']}, ASR "
                  + json.dumps({k: round(v, 3) for k, v in out["asr"].items()}))
    print("wall time per stage (s):", json.dumps(timings))
    print("results in", res)


if __name__ == "__main__":
    main()
