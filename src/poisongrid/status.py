"""Where each job and cell of a grid stands, read from the file system alone (outputs, their
temporary siblings, checkpoints, the rules' logs): `poisongrid status`.

A job is, in this order of precedence:

- done: every output exists;
- running: its marker (`<first output>.running`, liveness.py) names a process of this host that
  still exists; or, where that cannot be told (a job on another host), its log (unless the log
  ends in an error) or a temporary sibling of an output (an atomic write in progress,
  `.{name}.*.tmp`) was modified within the last `window` seconds (120 by default: training logs
  at least once a minute). A marker whose process is gone is a killed job, however fresh its log;
- checkpointed: `<output>.ckpt` or a final training's `<output>.ckpt.<phase>` exists (shown with
  the last finished epoch; a resubmitted job resumes from it);
- failed: its log's last lines contain an error (Traceback, ...Error, `error:`, Killed, CANCELLED);
- interrupted: its log exists but ends without an error or an output (e.g. killed by a signal);
- not started: no log, no output.

A cell (dataset/scenario/seed/defense) takes the state of its first job, in dependency order, that
is failed, else running, checkpointed or interrupted; else it is done (every job done), pending
(some jobs done, the next not started) or not started. torch is imported only to read a checkpoint.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from . import paths

JOB_STATES = ("done", "running", "checkpointed", "failed", "interrupted", "not started")
CELL_STATES = ("done", "running", "checkpointed", "failed", "interrupted", "pending", "not started")
RUNNING_WINDOW_S = 120.0
# What a failed stage leaves at the end of its log: a traceback, the CLI's `error:` line, or the
# scheduler's kill notice.
ERROR = re.compile(r"Traceback|Error\b|Exception\b|\berror:|Killed|CANCELLED|[Oo]ut of memory")
TAIL_LINES = 10


@dataclass
class Job:
    stage: str
    wildcards: dict
    outputs: list[str]
    log: str
    name: str  # unique: the log's path under the logs root, without `.log`
    state: str = "not started"
    detail: str = ""

    @property
    def label(self) -> str:
        """The job's wildcards beyond its cell's (model, detector, attack, bona fide set), after the stage."""
        extra = [str(self.wildcards[k]) for k in ("model", "detector", "attack", "bona") if k in self.wildcards]
        return " ".join([self.stage, *extra])


@dataclass
class Cell:
    dataset: str
    scenario: str
    seed: int
    defense: str
    jobs: list[Job] = field(default_factory=list)
    state: str = "not started"
    at: Job | None = None  # the job the state refers to

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.scenario}/seed{self.seed}/{self.defense}"


class _Listing:
    """One directory listing per folder: a grid's outputs share few folders, so this is a few
    hundred system calls for the paper grid instead of several per file."""

    def __init__(self) -> None:
        self._dirs: dict[str, dict[str, os.DirEntry]] = {}

    def folder(self, d: str) -> dict[str, os.DirEntry]:
        if d not in self._dirs:
            try:
                with os.scandir(d) as it:
                    self._dirs[d] = {e.name: e for e in it}
            except (FileNotFoundError, NotADirectoryError):
                self._dirs[d] = {}
        return self._dirs[d]

    def entry(self, p: str) -> os.DirEntry | None:
        d, name = os.path.split(p)
        return self.folder(d or ".").get(name)

    def checkpoints(self, p: str) -> list[str]:
        """Training checkpoints of output p: `<p>.ckpt` (a defender model), `<p>.ckpt.<phase>` (a
        remedy's final training, one per phase), newest first."""
        d, name = os.path.split(p)
        found = [e for n, e in self.folder(d or ".").items() if n == name + ".ckpt" or n.startswith(name + ".ckpt.")]
        return [e.path for e in sorted(found, key=_mtime, reverse=True)]

    def temporaries(self, p: str) -> list[os.DirEntry]:
        d, name = os.path.split(p)
        return [e for n, e in self.folder(d or ".").items() if n.startswith(f".{name}.") and n.endswith(".tmp")]


def grid_jobs(cfg: dict, results: str = "results", logs: str | None = None) -> tuple[list[Job], list[Cell]]:
    """Every job of the grid once (the aggregate last) and every cell with its jobs in dependency order;
    logs default to the grid's own (paths.logs_dir)."""
    from . import config
    from .jobs import cell_jobs

    logs = logs or paths.logs_dir(results)

    by_key: dict[tuple, Job] = {}
    cells = []
    for c in config.cells(cfg):
        cell = Cell(c["dataset"], c["scenario"], c["seed"], c["defense"])
        for stage, w in cell_jobs(cfg, c["dataset"], c["scenario"], c["seed"], [c["defense"]]):
            key = (stage, tuple(sorted(w.items())))
            if key not in by_key:
                by_key[key] = _job(stage, w, list(paths.outputs(stage, results, **w).values()), logs)
            cell.jobs.append(by_key[key])
        cells.append(cell)
    jobs = list(by_key.values())
    jobs.append(_job("aggregate", {}, [paths.path("summary", results)], logs))
    return jobs, cells


def _job(stage: str, w: dict, outputs: list[str], logs: str) -> Job:
    log = paths.log(stage, logs, **w)
    return Job(stage, w, outputs, log, os.path.relpath(log, logs)[: -len(".log")])


def classify(job: Job, fs: _Listing, now: float, window: float = RUNNING_WINDOW_S) -> None:
    """Set the job's state and detail (see the module's docstring for the rule)."""
    if all(fs.entry(o) is not None for o in job.outputs):
        job.state, job.detail = "done", ""
        return
    from .liveness import alive, marker

    log = fs.entry(job.log)
    tail = _tail(job.log) if log is not None else []
    error = any(ERROR.search(line) for line in tail)
    # A log that ends in an error was written by a process that has ended.
    fresh = ([log] if log is not None and not error else []) + [t for o in job.outputs for t in fs.temporaries(o)]
    ckpts = [c for o in job.outputs for c in fs.checkpoints(o)]
    # Evidence first: the job's own marker names its process (a killed job's process is gone);
    # only a job on another host (or from before markers) is judged by how fresh its files are.
    live = alive(marker(job.outputs)) if fs.entry(marker(job.outputs)) is not None else None
    if live is False:
        fresh = []
    if not error and (live is True or any(now - _mtime(e) < window for e in fresh)):
        job.state, job.detail = "running", (tail[-1] if tail else "")
    elif ckpts:
        job.state, job.detail = "checkpointed", checkpoint_progress(ckpts[0])
    elif error:
        job.state, job.detail = "failed", f"{job.log}: {tail[-1]}"
    elif log is not None:
        job.state, job.detail = "interrupted", f"{job.log} ends without an error or an output"
    else:
        job.state, job.detail = "not started", ""


def _mtime(e: os.DirEntry) -> float:
    try:
        return e.stat().st_mtime
    except FileNotFoundError:  # a temporary renamed away since the listing
        return 0.0


def _tail(path: str, nbytes: int = 8192) -> list[str]:
    """The log's last non-empty lines (a log can be long: read only its end)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - nbytes))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()][-TAIL_LINES:]


def checkpoint_progress(path: str) -> str:
    """'checkpoint after epoch k/n' from a training checkpoint (n: the epochs this run trains)."""
    import torch

    try:
        # mmap: only the small pickle is read, not the model and optimiser tensors.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return f"checkpoint after epoch {int(state['epoch']) + 1}/{int(state['epochs_to_run'])}"
    except Exception:  # noqa: BLE001 - the stage ignores an unreadable checkpoint too
        return f"unreadable checkpoint {path}"


def cell_state(cell: Cell) -> None:
    for state in ("failed", "running", "checkpointed", "interrupted"):
        job = next((j for j in cell.jobs if j.state == state), None)
        if job is not None:
            cell.state, cell.at = state, job
            return
    todo = [j for j in cell.jobs if j.state != "done"]
    if not todo:
        cell.state, cell.at = "done", cell.jobs[-1]
    else:
        cell.state, cell.at = ("pending" if len(todo) < len(cell.jobs) else "not started"), todo[0]


def collect(cfg: dict, results: str = "results", logs: str | None = None, now: float | None = None,
            window: float = RUNNING_WINDOW_S) -> tuple[list[Job], list[Cell]]:
    """Every job and cell of the grid `cfg` defines, with its state."""
    jobs, cells = grid_jobs(cfg, results, logs)
    fs, now = _Listing(), time.time() if now is None else now
    for j in jobs:
        classify(j, fs, now, window)
    for c in cells:
        cell_state(c)
    return jobs, cells


def totals(items, states) -> str:
    counts = {s: 0 for s in states}
    for it in items:
        counts[it.state] += 1
    return f"{len(items)}: " + ", ".join(f"{s} {n}" for s, n in counts.items())


def format_cells(cells: list[Cell]) -> list[str]:
    width = max((len(c.name) for c in cells), default=0)
    out = []
    for c in cells:
        done = sum(j.state == "done" for j in c.jobs)
        if c.state == "done":
            where = ""
        elif c.state in ("pending", "not started"):
            where = f"next: {c.at.label} ({done}/{len(c.jobs)} jobs done)"
        else:
            where = f"{c.at.label}" + (f": {c.at.detail}" if c.at.detail else "")
        out.append(f"{c.name:<{width}}  {c.state:<12}  {where}".rstrip())
    return out


def format_jobs(jobs: list[Job]) -> list[str]:
    width = max((len(j.name) for j in jobs), default=0)
    return [f"{j.name:<{width}}  {j.state:<12}  {j.detail}".rstrip() for j in jobs]


def report(cfg: dict, results: str = "results", logs: str | None = None, per_job: bool = False,
           window: float = RUNNING_WINDOW_S) -> str:
    jobs, cells = collect(cfg, results, logs, window=window)
    lines = format_jobs(jobs) if per_job else format_cells(cells)
    lines += ["", f"cells {totals(cells, CELL_STATES)}", f"jobs {totals(jobs, JOB_STATES)}"]
    return "\n".join(lines)


class Progress:
    """A grid's progress over repeated looks (`poisongrid status --watch`): jobs done of all, and an
    ETA from the rate at which jobs finished since watching began."""

    def __init__(self):
        self.first: tuple[float, int] | None = None

    def line(self, jobs: list[Job], now: float | None = None) -> str:
        now = time.time() if now is None else now
        counts = {s: sum(j.state == s for j in jobs) for s in JOB_STATES}
        done, total = counts["done"], len(jobs)
        if self.first is None:
            self.first = (now, done)
        t0, d0 = self.first
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        if done == total:
            eta = "all done"
        elif rate > 0:
            eta = f"ETA {_duration((total - done) / rate)} at {rate * 60:.2g} jobs/min since watching began"
        else:
            eta = "ETA: once a job finishes while watching"
        busy = ", ".join(f"{s} {counts[s]}" for s in ("running", "checkpointed", "failed", "interrupted") if counts[s])
        return (f"[{time.strftime('%H:%M:%S', time.localtime(now))}] jobs done {done}/{total} ({100 * done / max(total, 1):.0f}%)"
                + (f", {busy}" if busy else "") + f"; {eta}")


def _duration(seconds: float) -> str:
    m = int(round(seconds / 60))
    return f"{m // 60} h {m % 60} min" if m >= 60 else f"{max(m, 1)} min"
