"""Evidence that a stage's job runs: while it runs, the job keeps a small marker beside its first
output (`<output>.running`: process id, host, start time) and removes it when it ends, however it
ends short of a kill -9. `poisongrid status` reads it: on the same host a marker whose process is
gone means the job was killed; on another host (a cluster node) it falls back to how recently the
job's log changed."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Iterable, Iterator

SUFFIX = ".running"


def _write_marker(path: str) -> bool:
    """Write this process's marker (pid, host, start time) at `path`, atomically; False where the
    folder cannot be written (a read-only or full disk: the stage or job itself will say so)."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, fh)
        os.replace(tmp, path)
        return True
    except OSError:
        return False


def marker(outputs: Iterable[str]) -> str:
    return f"{sorted(map(str, outputs))[0]}{SUFFIX}"


@contextlib.contextmanager
def running(outputs: Iterable[str]) -> Iterator[None]:
    """Keep the job's marker while the block runs (rank 0 only under torchrun)."""
    path = marker(outputs)
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    if not _write_marker(path):
        path = None
    try:
        yield
    finally:
        if path:
            with contextlib.suppress(OSError):
                os.remove(path)


def alive(path: str) -> bool | None:
    """Whether the job that wrote this marker still runs: True or False when it ran on this host,
    None when that cannot be told here (another host, an unreadable marker)."""
    try:
        with open(path) as fh:
            m = json.load(fh)
        pid, host = int(m["pid"]), str(m["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that id: it exists
        return True
    return True


# A grid run's own marker in its results folder: a second run started on the same folder while the
# first still runs is told so, instead of Snakemake's advice to rerun "incomplete" files that the
# first run is in the middle of writing.
RUN_MARKER = ".poisongrid-run"


def claim_run(results: str) -> str | None:
    """Mark `results` as written by this process; if a live run on this host holds it already,
    return a message saying so (and mark nothing). A run on another host cannot be checked here
    (Snakemake's own lock still applies); a marker whose process is gone is stale and replaced."""
    path = os.path.join(results, RUN_MARKER)
    if alive(path):
        try:
            with open(path) as fh:
                m = json.load(fh)
            if int(m["pid"]) == os.getpid():
                return None
            started = time.strftime("%H:%M:%S", time.localtime(float(m.get("started", 0))))
            who = f"process {m['pid']} on {m['host']}, started at {started}"
        except (OSError, ValueError, KeyError):
            who = "another process"
        return (f"another run ({who}) is writing {results}: wait for it to finish or stop it; its files are not "
                "incomplete, so do not rerun them meanwhile")
    _write_marker(path)
    return None


def release_run(results: str) -> None:
    """Remove this process's marker from `results` (another process's stays)."""
    path = os.path.join(results, RUN_MARKER)
    try:
        with open(path) as fh:
            if int(json.load(fh).get("pid", -1)) != os.getpid():
                return
        os.remove(path)
    except (OSError, ValueError):
        pass
