"""Claims that let several workers share one plan: one lock file per result, holding a pid.

Each worker (one per core or GPU) runs the same config; before training a run it creates
``<result>.lock`` atomically. A lock whose process is gone is taken over.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["claim", "release"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def claim(path: Path) -> bool:
    """Take the run whose result is ``path`` for this process: create ``<path>.lock`` (holding
    our pid) atomically. False when another live process on this machine holds it; a lock left
    by a dead process is taken over. Release with :func:`release`."""
    lock = path.with_name(path.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and owner != os.getpid() and _alive(owner):
                return False
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(handle, "w") as stream:
            stream.write(str(os.getpid()))
        return True
    return False


def release(path: Path) -> None:
    """Remove the lock that :func:`claim` made for ``path``."""
    path.with_name(path.name + ".lock").unlink(missing_ok=True)
