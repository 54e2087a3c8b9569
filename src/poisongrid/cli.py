"""`poisongrid <stage>`: one subcommand per stage. Each stage reads and writes files only.

A stage gets its settings either as `--spec JSON` (what the Snakemake rules pass: only the part
of the config that stage depends on) or as `--config FILE` plus the cell's coordinates
(`--dataset --scenario --seed --defense`), resolved exactly as the Snakefile would. Paths default
to the standard layout under `--results`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import paths
from .errors import PoisongridError


def _log(msg: str) -> None:
    if os.environ.get("RANK", "0") != "0":
        return  # data-parallel training: rank 0 speaks for all processes
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# File flags every stage subcommand accepts; each stage reads or writes the ones paths.STAGES declares.
FILE_FLAGS = ("manifest", "images", "bona_fide", "weights", "trajectories", "features", "scores", "plan", "out")


def _add_config(p: argparse.ArgumentParser, default: list[str] | None = None, stage: bool = False) -> None:
    """The one form every command takes a grid in: --configfile FILE... (merged in order, as
    Snakemake merges them) and --config KEY=YAML... (dotted keys allowed)."""
    p.add_argument("--configfile", nargs="+", action="extend", metavar="FILE",
                   help="the grid's config file(s), merged in order" + (f" (default: {default[0]})" if default else ""))
    p.add_argument("--config", nargs="+", action="extend", metavar="KEY=YAML",
                   help="overrides merged over the files, e.g. seeds=[0,1] datasets.digits.epochs=8"
                   + ("; a FILE here is read as --configfile FILE" if stage else ""))
    p.set_defaults(default_configfile=default)


def grid_config(args, stage: bool = False) -> tuple[list[str], dict]:
    """(config files, overrides) of a command's --configfile/--config; a stage also takes the older
    `--config FILE`."""
    from . import config

    files = list(args.configfile or [])
    entries = []
    for e in args.config or []:
        if stage and "=" not in e:
            files.append(e)
        else:
            entries.append(e)
    if not files and args.default_configfile:
        files = list(args.default_configfile)
    return files, config.parse_overrides(entries)


def _add_cell(p: argparse.ArgumentParser, stage: str) -> None:
    _add_config(p, stage=True)
    p.add_argument("--spec", help="the stage's resolved settings as JSON, or @file")
    p.add_argument("--results", help="results root for default paths (default: the config's results folder, "
                   "else results); give another one to run a stage by hand without touching the workflow's files")
    for w in paths.STAGES[stage].cell:
        p.add_argument(f"--{w}", type=int if w == "seed" else str)
    for f in FILE_FLAGS:
        p.add_argument(f"--{f}", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--trigger", action="append", metavar="ATTACK=PATH", help=argparse.SUPPRESS)


def _spec(args, stage: str) -> dict:
    if args.spec:
        text = open(args.spec[1:]).read() if args.spec.startswith("@") else args.spec
        return json.loads(text)
    files, overrides = grid_config(args, stage=True)
    if not files:
        raise PoisongridError(f"`poisongrid {stage}` needs --spec JSON or --configfile FILE with the cell's --dataset/--seed/...")
    from . import config

    # Every check but the LfD teachers' sizes, which may build models (torch) in a light job run by
    # hand; `poisongrid validate` and the workflow make that one.
    cfg = config.load(files, overrides, sizes=False)
    if args.results is None:
        args.results = config.results_dir(cfg, files)
    cell = {k: getattr(args, k, None) for k in ("scenario", "defense", "detector", "model", "bona")}
    return config.stage_spec(cfg, stage, args.dataset, seed=args.seed, **cell)


def _from_spec(spec: dict) -> dict:
    """Cell wildcards a stage's spec already names."""
    d = spec.get("defense")
    m = spec.get("model")
    b = spec.get("bona_fide")
    return {"dataset": (spec.get("dataset") or {}).get("name"), "seed": spec.get("seed"), "scenario": spec.get("scenario"),
            "detector": spec.get("detector"), "defense": d["name"] if isinstance(d, dict) else d,
            "model": m["name"] if isinstance(m, dict) else (m if "type" not in spec else None),
            "bona": spec.get("bona") or (b if isinstance(b, str) else None)}


def _trigger_flags(items: list[str] | None) -> dict[str, str]:
    out = {}
    for it in items or []:
        name, _, path = it.partition("=")
        if not path:
            raise PoisongridError(f"--trigger takes ATTACK=PATH, got {it!r}")
        out[paths.TRIGGER + name] = path
    return out


def run_stage(stage: str, args) -> dict:
    """Resolve a stage's spec and files (defaults from the declared layout, flags override), run it."""
    from . import stages

    spec = _spec(args, stage)
    args.results = args.results or "results"
    known = _from_spec(spec)
    cell = {w: getattr(args, w, None) if getattr(args, w, None) is not None else known.get(w) for w in paths.STAGES[stage].cell}
    given = {f: getattr(args, f) for f in FILE_FLAGS if getattr(args, f, None)}
    given.update(_trigger_flags(args.trigger))
    out_names = set(paths.STAGES[stage].outputs)
    full = {k: v for k, v in cell.items() if v is not None}
    default_out = paths.outputs(stage, args.results, **full)
    out = {n: given.get(n) or default_out[n] for n in out_names}
    declared = paths.STAGES[stage].inputs(spec)
    # Default paths only for inputs no flag gave (a cell coordinate may be missing then).
    defaults = paths.inputs(stage, spec, args.results, **full) if set(declared) - set(given) else {}
    inp = {n: given.get(n) or defaults[n] for n in declared}
    unused = set(given) - out_names - set(declared)
    if unused:
        raise PoisongridError(f"`poisongrid {stage}` does not use {', '.join('--' + u.replace(paths.TRIGGER, 'trigger ') for u in sorted(unused))} here")
    for n, v in out.items():
        if "{" in v:
            missing = sorted(w for w in paths.STAGES[stage].cell if cell.get(w) is None)
            raise PoisongridError(f"give --{n} or the cell coordinates {['--' + m for m in missing]}")
    from .liveness import running

    fn = getattr(stages, stage)
    with running(out.values()):
        return fn(spec, inp, out, log=_log)


def cmd_aggregate(args) -> None:
    from . import aggregate

    metrics = list(args.metrics)
    if not metrics:
        import glob

        metrics = sorted(glob.glob(paths.glob("metrics", args.results)))
    if not metrics:
        raise PoisongridError(f"no metrics.json under {args.results}/; run the grid first")
    written = aggregate.run(metrics, args.out or args.results, trajectory_paths=args.trajectories,
                            teacher_paths=args.teacher_losses, paper_numbers=args.paper_numbers)
    tables = [p for p in written.get("tables", [])]
    for t in tables:
        print(open(t).read())


def cmd_validate(args) -> None:
    from . import config

    if args.file:
        args.configfile = list(args.file) + list(args.configfile or [])
    files, overrides = grid_config(args)
    cfg = config.load(files, overrides)
    if not args.no_data:
        config.check_data(cfg)
    for w in config.warnings(cfg):
        print(f"poisongrid validate: warning: {w}", file=sys.stderr)
    n = len(config.cells(cfg))
    print(f"{' + '.join(files)}{' with overrides' if overrides else ''}: valid; {len(cfg['datasets'])} dataset(s), "
          f"{n} cell(s); results go to {config.results_dir(cfg, files)}")


def cmd_status(args) -> None:
    from . import config, status

    files, overrides = grid_config(args)
    cfg = config.load(files, overrides, deep=False)  # status only lists files: no need to read data headers
    results = args.results or config.results_dir(cfg, files)
    logs = args.logs or paths.logs_dir(results)
    try:
        print(status.report(cfg, results, logs, per_job=args.jobs, window=args.window), flush=True)
        if args.watch:
            # Then one line per look: the whole grid's progress with an ETA, until every job is done.
            progress, looks = status.Progress(), 0
            while True:
                jobs, _ = status.collect(cfg, results, logs, window=args.window)
                print(progress.line(jobs), flush=True)
                looks += 1
                if all(j.state == "done" for j in jobs) or (args.looks and looks >= args.looks):
                    break
                time.sleep(args.watch)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `poisongrid status | head`: the reader left; nothing is wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cmd_show(args) -> None:
    """Print a trajectory / manifest / scores file's shape, metadata and first rows."""
    import pyarrow.parquet as pq

    from .io import META_KEY

    pf = pq.ParquetFile(args.file)
    md = json.loads((pf.metadata.metadata or {}).get(META_KEY, b"{}"))
    print(f"{args.file}: {pf.metadata.num_rows} rows x {pf.metadata.num_columns} columns, kind={md.get('kind')}")
    print(json.dumps({k: v for k, v in md.items() if k != "kind"}, indent=1, default=str)[:4000])
    print(pf.read_row_group(0).to_pandas().head(args.rows).to_string())


def snakemake_argv(args: list[str]) -> list[str]:
    """Snakemake's arguments with each `--config` entry in a form it accepts: Snakemake refuses a
    dotted key (datasets.digits.epochs=8), so entries sharing a top-level key are merged into one
    YAML flow mapping (datasets={digits: {epochs: 8}}); other arguments pass through unchanged."""
    import yaml

    from .config import parse_overrides

    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a != "--config":
            out.append(a)
            i += 1
            continue
        entries = []
        i += 1
        while i < len(args) and not args[i].startswith("-"):
            entries.append(args[i])
            i += 1
        merged = parse_overrides(entries)
        out.append("--config")
        for key, value in merged.items():
            text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
            if text.endswith("\n..."):
                text = text[: -len("\n...")]
            out.append(f"{key}={'' if value is None else text}")
    return out


def cmd_run(args) -> None:
    """Snakemake on this package's workflow, with dotted --config keys accepted."""
    import os
    from pathlib import Path

    snakefile = Path(os.environ.get("POISONGRID_ROOT") or Path.cwd()) / "Snakefile"
    argv = snakemake_argv(args.snakemake_args)
    if "-s" not in argv and "--snakefile" not in argv and not snakefile.exists():
        raise PoisongridError(f"no Snakefile in {snakefile.parent}: run from the poisongrid checkout (or set POISONGRID_ROOT)")
    sys.stdout.flush()
    os.execvp(sys.executable, [sys.executable, "-m", "snakemake", *argv])


def cmd_estimate(args) -> None:
    from . import config, estimate

    files, overrides = grid_config(args)
    cfg = config.load(files, overrides)
    print(estimate.render(estimate.estimate(cfg), estimate.rates(cfg)))


def _version() -> str:
    from pathlib import Path

    from . import __version__

    return f"poisongrid {__version__} from {Path(__file__).resolve().parent}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="poisongrid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (also POISONGRID_DEBUG=1)")
    ap.add_argument("--version", action="version", version=_version(),
                    help="print the version and where the package is imported from")
    sub = ap.add_subparsers(dest="cmd", required=True)

    helps = {
        "trigger": "optimise a learned trigger (Narcissus) for a dataset and seed",
        "poison": "build the poisoned training set of a scenario",
        "bonafide": "draw the bona fide examples (those the defender knows to be clean) of a poisoned set",
        "pretrain": "train a defender model (--model) on the poisoned set, recording per-example losses",
        "features": "penultimate-layer features of every training example under a defender model",
        "score": "anomaly score of every training example by one detector",
        "plan": "per-example weights of a defense (1 keep, 0 drop, < 0 gradient ascent)",
        "train": "train the final model on the plan's weighted examples",
        "evaluate": "clean accuracy, ASR per attack, detection quality -> metrics.json",
    }
    for stage, text in helps.items():
        p = sub.add_parser(stage, help=text, description=text + ". Files default to the layout under --results; "
                           "--manifest/--images/--bona_fide/--weights/--trajectories/--features/--scores/--plan/--out PATH and "
                           "--trigger ATTACK=PATH override them.")
        _add_cell(p, stage)
        p.set_defaults(fn=lambda args, stage=stage: run_stage(stage, args))

    p = sub.add_parser("aggregate", help="summary.csv/.parquet, Markdown tables and figures")
    p.add_argument("--results", default="results")
    p.add_argument("--out", help="output folder (default: --results)")
    p.add_argument("--metrics", nargs="*", default=[])
    p.add_argument("--trajectories", nargs="*", default=[], help="defender models' per-epoch loss files to draw")
    p.add_argument("--teacher-losses", nargs="*", default=[], help="LfD teachers' loss files to draw")
    p.add_argument("--paper-numbers", default=None, help="the preset whose papers' numbers go beside the measured cells "
                   "(a grid's paper_numbers, e.g. badloss-paper)")
    p.set_defaults(fn=cmd_aggregate)

    p = sub.add_parser("validate", help="check a grid's config and count its cells")
    p.add_argument("file", nargs="*", metavar="FILE", help="config file(s), the same as --configfile")
    _add_config(p, ["config.yaml"])
    p.add_argument("--no-data", action="store_true", help="check the config alone, not that its data is in place "
                   "(e.g. before copying a grid to the cluster that holds the data)")
    p.set_defaults(fn=cmd_validate)

    from . import status

    p = sub.add_parser("status", help="which cells and jobs of a grid are done, running, checkpointed, failed or not started",
                       description=status.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config(p, ["config.yaml"])
    p.add_argument("--results", help="results root (default: the config's results folder)")
    p.add_argument("--logs", help="the rules' log root (default: <results>/logs)")
    p.add_argument("--jobs", action="store_true", help="one line per job instead of one per cell")
    p.add_argument("--watch", type=float, nargs="?", const=60.0, default=None, metavar="SECONDS",
                   help="after the report, a line of progress (jobs done, ETA) every SECONDS (default 60) until all are done")
    p.add_argument("--looks", type=int, default=0, help=argparse.SUPPRESS)  # stop --watch after this many (tests)
    p.add_argument("--window", type=float, default=status.RUNNING_WINDOW_S, metavar="SECONDS",
                   help="a log or temporary file modified this recently marks a job running (default: %(default)g)")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("estimate", help="a grid's jobs per stage and their GPU hours, before running it",
                       description="GPU time from each dataset's minutes_per_epoch (measured on one GPU, see the README) "
                       "and each defender model's, detector's and remedy's work in epochs of the dataset's training.")
    _add_config(p, ["config.yaml"])
    p.set_defaults(fn=cmd_estimate)

    p = sub.add_parser("run", help="snakemake on the workflow, accepting dotted --config keys (datasets.digits.epochs=8)",
                       description="Runs `python -m snakemake ARGS`, first rewriting --config entries with dotted keys "
                       "into the nested YAML Snakemake accepts; every other argument passes through.")
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER, metavar="ARGS")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("show", help="print a poisongrid Parquet file's metadata and first rows")
    p.add_argument("file"); p.add_argument("--rows", type=int, default=5)
    p.set_defaults(fn=cmd_show)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"] and not {"-h", "--help"} & set(argv[1:2]):
        # Everything after `run` is Snakemake's (argparse would take its options for ours).
        args = argparse.Namespace(cmd="run", fn=cmd_run, snakemake_args=argv[1:], debug=False)
    else:
        args = build_parser().parse_args(argv)
    import os

    if os.environ.get("SLURM_JOB_ID"):
        # Names the scheduler job in the rule's log, so a failed cell points at `sacct -j`/`seff`.
        _log(f"poisongrid {args.cmd} in SLURM job {os.environ['SLURM_JOB_ID']} on {os.uname().nodename}")
    debug = args.debug or os.environ.get("POISONGRID_DEBUG", "") not in ("", "0")
    try:
        args.fn(args)
    except PoisongridError as e:
        if debug:
            raise
        # One line, unless the message itself is a list (every problem of a config).
        print(f"poisongrid {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `poisongrid show … | head`: the reader left; nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # disk full, permissions, a missing file: say which path
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"poisongrid {args.cmd}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user; the traceback on request
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"poisongrid {args.cmd}: error: {type(e).__name__}: {first} (POISONGRID_DEBUG=1 or --debug shows the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
