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


def marker(outputs: Iterable[str]) -> str:
    return f"{sorted(map(str, outputs))[0]}{SUFFIX}"


@contextlib.contextmanager
def running(outputs: Iterable[str]) -> Iterator[None]:
    """Keep the job's marker while the block runs (rank 0 only under torchrun)."""
    path = marker(outputs)
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, fh)
        os.replace(tmp, path)
    except OSError:  # a read-only or full disk: the stage itself will say so
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
