"""Run one grid cell's stages in-process on a chosen device and print what each took.

    python benchmarks/cell.py --config configs/demo.yaml --dataset digits --scenario multi --device cuda

A quick way to check a device end to end (CUDA: bf16 autocast, channels-last) without Snakemake;
outputs go to a temporary folder unless --results is given."""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from poisongrid import config, paths, stages
from poisongrid.attacks import ATTACKS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--scenario", default="multi")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--defenses", nargs="*", default=["none", "badloss"])
    ap.add_argument("--results")
    args = ap.parse_args(argv)
    cfg = config.load(args.config, {"device": args.device})
    res = args.results or tempfile.mkdtemp(prefix="poisongrid-cell-")
    cell = dict(results=res, dataset=args.dataset, scenario=args.scenario, seed=args.seed)
    ds = cfg["datasets"][args.dataset]
    timings = {}

    def timed(name, fn, *a, **k):
        t0 = time.perf_counter()
        out = fn(*a, **k)
        timings[name] = round(time.perf_counter() - t0, 2)
        return out

    trig = {}
    for a in config.scenario_attacks(ds, args.scenario):
        if ATTACKS.get(a).needs_trigger_file:
            trig[a] = paths.path("trigger", res, dataset=args.dataset, attack=a, seed=args.seed)
            timed(f"trigger:{a}", stages.trigger, config.stage_spec(cfg, "trigger", args.dataset, seed=args.seed), trig[a])
    man, imgs = paths.path("manifest", **cell), paths.path("poisoned", **cell)
    timed("poison", stages.poison, config.stage_spec(cfg, "poison", args.dataset, args.scenario, args.seed), man, imgs, trig)
    traj = paths.path("trajectories", **cell)
    pmeta = timed("pretrain", stages.pretrain, config.stage_spec(cfg, "pretrain", args.dataset, args.scenario, args.seed), man, imgs, traj)
    print(f"pretrain: {pmeta['images_per_s']:.0f} img/s on {pmeta['device']}, skipped epochs {pmeta['skipped_epochs']}")
    for d in args.defenses:
        dcfg = cfg["defenses"][d]
        scores = None
        if dcfg.get("detector"):
            det = dcfg["detector"]
            scores = paths.path("scores", detector=det, **cell)
            timed(f"score:{det}", stages.score, config.stage_spec(cfg, "score", args.dataset, args.scenario, args.seed, detector=det),
                  {"trajectories": traj, "manifest": man}, scores)
        keep = paths.path("filter", defense=d, **cell)
        stages.filter_(config.stage_spec(cfg, "filter", args.dataset, args.scenario, args.seed, d), man, keep, scores)
        model = paths.path("model", defense=d, **cell)
        tm = timed(f"train:{d}", stages.train, config.stage_spec(cfg, "train", args.dataset, args.scenario, args.seed, d), man, imgs, keep, model)
        m = timed(f"evaluate:{d}", stages.evaluate, config.stage_spec(cfg, "evaluate", args.dataset, args.scenario, args.seed, d), man, keep,
                  model, paths.path("metrics", defense=d, **cell), trig, traj if scores else None, scores)
        print(f"{d}: clean acc {m['clean_accuracy']:.4f}, mean ASR {m['mean_asr']:.4f} (boosted {m['mean_asr_boosted']:.4f}), "
              f"train {tm['images_per_s']:.0f} img/s on {m['device']}, ASR " + json.dumps({k: round(v, 3) for k, v in m["asr"].items()}))
    print("wall time per stage (s):", json.dumps(timings))
    print("results in", res)


if __name__ == "__main__":
    main()
