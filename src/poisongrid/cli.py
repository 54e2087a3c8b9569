"""`poisongrid <stage>`: one subcommand per stage. Each stage reads and writes files only.

A stage gets its settings either as `--spec JSON` (what the Snakemake rules pass: only the part
of the config that stage depends on) or as `--config FILE` plus the cell's coordinates
(`--dataset --scenario --seed --defense`), resolved exactly as the Snakefile would. Paths default
to the standard layout under `--results`."""
from __future__ import annotations

import argparse
import json
import sys
import time

from . import paths
from .errors import PoisongridError


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _add_cell(p: argparse.ArgumentParser, *, scenario=True, defense=False, detector=False) -> None:
    p.add_argument("--config", help="grid config YAML (alternative to --spec)")
    p.add_argument("--spec", help="the stage's resolved settings as JSON, or @file")
    p.add_argument("--results", default="results", help="results root for default paths (default: results)")
    p.add_argument("--dataset")
    p.add_argument("--seed", type=int)
    if scenario:
        p.add_argument("--scenario")
    if defense:
        p.add_argument("--defense")
    if detector:
        p.add_argument("--detector")


def _spec(args, stage: str) -> dict:
    if args.spec:
        text = open(args.spec[1:]).read() if args.spec.startswith("@") else args.spec
        return json.loads(text)
    if not args.config:
        raise PoisongridError(f"`poisongrid {stage}` needs --spec JSON or --config FILE with the cell's --dataset/--seed/...")
    from . import config

    cfg = config.load(args.config)
    return config.stage_spec(cfg, stage, args.dataset, getattr(args, "scenario", None), args.seed,
                             getattr(args, "defense", None), getattr(args, "detector", None))


def _cell(args, spec: dict) -> dict:
    """Wildcards for default paths: from the flags, else from the spec."""
    w = {"dataset": args.dataset or spec.get("dataset", {}).get("name"), "seed": args.seed if args.seed is not None else spec.get("seed")}
    for k in ("scenario", "defense", "detector"):
        w[k] = getattr(args, k, None)
    return w


def _need(value, flag: str):
    if value is None:
        raise PoisongridError(f"missing {flag}: give it, or the cell coordinates it is derived from")
    return value


def _default(args, attr: str, kind: str, **w) -> str:
    given = getattr(args, attr, None)
    if given:
        return given
    missing = [k for k, v in w.items() if v is None]
    if missing:
        raise PoisongridError(f"give --{attr.replace('_', '-')} or the cell coordinates {['--' + m for m in missing]}")
    return paths.path(kind, **w)


def _triggers(items: list[str] | None) -> dict[str, str]:
    out = {}
    for it in items or []:
        name, _, path = it.partition("=")
        if not path:
            raise PoisongridError(f"--trigger takes NAME=PATH, got {it!r}")
        out[name] = path
    return out


def _default_triggers(args, spec: dict, w: dict) -> dict[str, str]:
    from .attacks import ATTACKS

    given = _triggers(args.trigger)
    attacks = spec.get("attacks") or {a: None for a in _manifest_attacks(args, w)}
    for a in attacks:
        if ATTACKS.get(a).needs_trigger_file and a not in given:
            given[a] = paths.path("trigger", results=args.results, dataset=w["dataset"], attack=a, seed=w["seed"])
    return given


def _manifest_attacks(args, w) -> list[str]:
    from .poisoning import read_manifest

    return list(read_manifest(_default(args, "manifest", "manifest", results=args.results, **_pick(w, "dataset", "scenario", "seed")))[1]["attacks"])


def _pick(w: dict, *keys) -> dict:
    return {k: w[k] for k in keys}


def cmd_trigger(args) -> None:
    from . import stages

    spec = _spec(args, "trigger")
    w = _cell(args, spec)
    out = _default(args, "out", "trigger", results=args.results, dataset=w["dataset"], attack="narcissus", seed=w["seed"])
    stages.trigger(spec, out, log=_log)


def cmd_poison(args) -> None:
    from . import stages

    spec = _spec(args, "poison")
    w = _cell(args, spec)
    w["scenario"] = w["scenario"] or spec.get("scenario")
    cw = dict(results=args.results, **_pick(w, "dataset", "scenario", "seed"))
    meta = stages.poison(spec, _default(args, "manifest", "manifest", **cw), _default(args, "images", "poisoned", **cw),
                         _default_triggers(args, spec, w))
    _log("poisoned " + ", ".join(f"{a}: {i['count']} -> class {i['target']}" for a, i in meta["attacks"].items()))


def cmd_pretrain(args) -> None:
    from . import stages

    spec = _spec(args, "pretrain")
    w = _cell(args, spec)
    cw = dict(results=args.results, **_pick(w, "dataset", "scenario", "seed"))
    stages.pretrain(spec, _default(args, "manifest", "manifest", **cw), _default(args, "images", "poisoned", **cw),
                    _default(args, "out", "trajectories", **cw), log=_log)


def cmd_score(args) -> None:
    from . import stages
    from .detectors import DETECTORS

    spec = _spec(args, "score")
    w = _cell(args, {})
    w["detector"] = w["detector"] or spec.get("detector")
    cw = dict(results=args.results, **_pick(w, "dataset", "scenario", "seed"))
    inputs = {}
    for kind in DETECTORS.get(spec["type"]).inputs:
        inputs[kind] = _default(args, kind, kind, **cw)
    out = _default(args, "out", "scores", detector=w["detector"], **cw)
    meta = stages.score(spec, inputs, out)
    _log(f"scores written to {out} ({meta['wall_time_s']:.2f}s)")


def cmd_filter(args) -> None:
    from . import stages

    spec = _spec(args, "filter")
    w = _cell(args, {})
    w["defense"] = w["defense"] or spec.get("defense")
    cw = dict(results=args.results, **_pick(w, "dataset", "scenario", "seed"))
    scores = None
    if spec.get("detector"):
        scores = _default(args, "scores", "scores", detector=spec["detector"], **cw)
    meta = stages.filter_(spec, _default(args, "manifest", "manifest", **cw), _default(args, "out", "filter", defense=w["defense"], **cw), scores)
    _log(f"filter: removed {meta['n_removed']} of {meta['n_train']}")


def cmd_train(args) -> None:
    from . import stages

    spec = _spec(args, "train")
    w = _cell(args, spec)
    cw = dict(results=args.results, **_pick(w, "dataset", "scenario", "seed"))
    stages.train(spec, _default(args, "manifest", "manifest", **cw), _default(args, "images", "poisoned", **cw),
                 _default(args, "keep", "filter", defense=w["defense"], **cw),
                 _default(args, "out", "model", defense=w["defense"], **cw), log=_log)


def cmd_evaluate(args) -> None:
    from . import stages

    spec = _spec(args, "evaluate")
    w = _cell(args, spec)
    w["defense"] = w["defense"] or spec["defense"]["name"]
    cw = dict(results=args.results, **_pick(w, "dataset", "scenario", "seed"))
    d = spec["defense"]
    stages.evaluate(
        spec, _default(args, "manifest", "manifest", **cw), _default(args, "keep", "filter", defense=w["defense"], **cw),
        _default(args, "model", "model", defense=w["defense"], **cw), _default(args, "out", "metrics", defense=w["defense"], **cw),
        trigger_paths=_default_triggers(args, {}, w),
        pretrain_path=args.trajectories or (paths.path("trajectories", **cw) if d.get("detector") else None),
        scores_path=args.scores or (paths.path("scores", detector=d["detector"], **cw) if d.get("detector") else None),
        log=_log)


def cmd_aggregate(args) -> None:
    from . import aggregate

    metrics = list(args.metrics)
    if not metrics:
        import glob

        metrics = sorted(glob.glob(f"{args.results}/*/*/seed*/*/metrics.json"))
    if not metrics:
        raise PoisongridError(f"no metrics.json under {args.results}/; run the grid first")
    cells = [(t, t.replace("/pretrain/trajectories.parquet", "/poison/manifest.parquet")) for t in args.trajectories]
    written = aggregate.run(metrics, args.out or args.results, trajectory_cells=cells)
    tables = [p for p in written.get("tables", [])]
    for t in tables:
        print(open(t).read())


def cmd_validate(args) -> None:
    from . import config

    cfg = config.load(args.config)
    n = len(config.cells(cfg))
    print(f"{args.config}: valid; {len(cfg['datasets'])} dataset(s), {n} cell(s)")


def cmd_show(args) -> None:
    """Print a trajectory / manifest / scores file's shape, metadata and first rows."""
    import pyarrow.parquet as pq

    from .io import META_KEY

    pf = pq.ParquetFile(args.file)
    md = json.loads((pf.schema_arrow.metadata or {}).get(META_KEY, b"{}"))
    print(f"{args.file}: {pf.metadata.num_rows} rows x {pf.metadata.num_columns} columns, kind={md.get('kind')}")
    print(json.dumps({k: v for k, v in md.items() if k != "kind"}, indent=1, default=str)[:4000])
    print(pf.read_row_group(0).to_pandas().head(args.rows).to_string())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="poisongrid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("trigger", help="optimise a learned trigger (Narcissus) for a dataset and seed")
    _add_cell(p, scenario=False)
    p.add_argument("--out")
    p.set_defaults(fn=cmd_trigger)

    p = sub.add_parser("poison", help="build the poisoned training set of a scenario")
    _add_cell(p)
    p.add_argument("--manifest"); p.add_argument("--images")
    p.add_argument("--trigger", action="append", metavar="NAME=PATH")
    p.set_defaults(fn=cmd_poison)

    p = sub.add_parser("pretrain", help="short run recording every example's loss trajectory")
    _add_cell(p)
    p.add_argument("--manifest"); p.add_argument("--images"); p.add_argument("--out")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("score", help="anomaly score of every training example")
    _add_cell(p, detector=True)
    p.add_argument("--manifest"); p.add_argument("--trajectories"); p.add_argument("--out")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("filter", help="choose the examples a defense removes")
    _add_cell(p, defense=True)
    p.add_argument("--manifest"); p.add_argument("--scores"); p.add_argument("--out")
    p.set_defaults(fn=cmd_filter)

    p = sub.add_parser("train", help="train the final model on the kept examples")
    _add_cell(p, defense=True)
    p.add_argument("--manifest"); p.add_argument("--images"); p.add_argument("--keep"); p.add_argument("--out")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="clean accuracy, ASR per attack, detection quality -> metrics.json")
    _add_cell(p, defense=True)
    p.add_argument("--manifest"); p.add_argument("--keep"); p.add_argument("--model"); p.add_argument("--out")
    p.add_argument("--trigger", action="append", metavar="NAME=PATH")
    p.add_argument("--trajectories"); p.add_argument("--scores")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("aggregate", help="summary.csv/.parquet, Markdown tables and figures")
    p.add_argument("--results", default="results")
    p.add_argument("--out", help="output folder (default: --results)")
    p.add_argument("--metrics", nargs="*", default=[])
    p.add_argument("--trajectories", nargs="*", default=[])
    p.set_defaults(fn=cmd_aggregate)

    p = sub.add_parser("validate", help="check a config file and count its cells")
    p.add_argument("config")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("show", help="print a poisongrid Parquet file's metadata and first rows")
    p.add_argument("file"); p.add_argument("--rows", type=int, default=5)
    p.set_defaults(fn=cmd_show)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import os

    if os.environ.get("SLURM_JOB_ID"):
        # Names the scheduler job in the rule's log, so a failed cell points at `sacct -j`/`seff`.
        _log(f"poisongrid {args.cmd} in SLURM job {os.environ['SLURM_JOB_ID']} on {os.uname().nodename}")
    try:
        args.fn(args)
    except PoisongridError as e:
        print(f"poisongrid {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
