"""Start-up cost of the light jobs: the wall time of each `poisongrid` command a grid runs many
times (poison, score and plan of trajectory detectors, validate, estimate, aggregate) on a
finished cell's real artifacts, and whether it imported torch. Evaluate is shown for reference:
it runs a model over the test set, so it needs torch.

    snakemake --cores 1 --configfile configs/demo.yaml results/demo/digits/multi/seed0/badloss/metrics.json
    python benchmarks/light_stages.py --config configs/demo.yaml --repeat 3

Run it from the folder the grid ran in (its `data_dir` and results are relative to it). Every
output goes to a temporary folder; the cell's files are only read. Prints the median wall time
of `--repeat` runs per command."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import poisongrid
from poisongrid import config, paths

# The children run the poisongrid this script imported.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(poisongrid.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}

# Runs the CLI as the console script does, then says whether torch was imported.
RUN = ("import sys\nfrom poisongrid.cli import main\nrc = main(sys.argv[1:])\n"
       "print('TORCH_IMPORTED=%d' % ('torch' in sys.modules), file=sys.stderr)\nsys.exit(rc)")


def commands(cfg_path: str, dataset: str, scenario: str, seed: int, defense: str, tmp: Path) -> dict[str, list[str]]:
    cfg = config.load(cfg_path)
    res = config.results_dir(cfg, [cfg_path])
    cell = {"dataset": dataset, "scenario": scenario, "seed": seed}
    detector = cfg["defenses"][defense].get("detector")

    def spec_cmd(stage: str, out: dict[str, str], **extra) -> list[str]:
        spec = config.stage_spec(cfg, stage, dataset, seed=seed, scenario=scenario, **extra)
        inp = paths.inputs(stage, spec, res, **cell, **extra)
        flags = [f"--trigger={k[len(paths.TRIGGER):]}={v}" if k.startswith(paths.TRIGGER) else f"--{k}={v}"
                 for k, v in inp.items()]
        return [stage, "--spec", json.dumps(spec, sort_keys=True), *flags, *[f"--{k}={v}" for k, v in out.items()]]

    metrics = paths.path("metrics", res, **cell, defense=defense)
    score = {f"score ({detector})": spec_cmd("score", {"out": str(tmp / "s.parquet")}, detector=detector)} if detector else {}
    return {
        f"poison ({scenario})": spec_cmd("poison", {"manifest": str(tmp / "m.parquet"), "images": str(tmp / "p.npz")}),
        **score,
        f"plan ({defense})": spec_cmd("plan", {"out": str(tmp / "plan.parquet")}, defense=defense),
        "plan --config": ["plan", "--config", cfg_path, "--dataset", dataset, "--scenario", scenario, "--seed", str(seed),
                          "--defense", defense, "--out", str(tmp / "plan2.parquet")],
        "validate": ["validate", cfg_path],
        "estimate": ["estimate", "--configfile", cfg_path],
        "aggregate": ["aggregate", "--results", res, "--out", str(tmp / "agg"), "--metrics", metrics],
        f"evaluate ({defense}, needs torch)": spec_cmd("evaluate", {"out": str(tmp / "metrics.json")}, defense=defense),
    }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(argv: list[str]) -> tuple[float, float, bool]:
    """Wall time, CPU time (less sensitive to a busy machine) and whether torch was imported."""
    c0, t0 = _cpu(), time.perf_counter()
    p = subprocess.run([sys.executable, "-c", RUN, *argv], capture_output=True, text=True, env=ENV)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if p.returncode != 0:
        raise SystemExit(f"poisongrid {' '.join(argv[:1])} failed:\n{p.stderr[-2000:]}")
    return wall, cpu, "TORCH_IMPORTED=1" in p.stderr


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--scenario", default="multi")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--defense", default="badloss")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="the commands to time (names as printed)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(args.config, args.dataset, args.scenario, args.seed, args.defense, Path(tmp))
        print(f"{'command':34} {'wall s':>7} {'min s':>6} {'cpu s':>6}  torch  (median of {args.repeat})")
        for name, cmd in cmds.items():
            if args.only and not any(name.startswith(o) for o in args.only):
                continue
            runs = [run(cmd) for _ in range(args.repeat)]
            walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
            print(f"{name:34} {statistics.median(walls):7.3f} {min(walls):6.3f} {statistics.median(cpus):6.3f}  "
                  f"{'yes' if runs[-1][2] else 'no'}", flush=True)


if __name__ == "__main__":
    main()
