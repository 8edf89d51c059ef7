"""Start ``world_size`` CPU processes with a gloo process group, bounded in time.

The rendezvous store lives in the test process on a port the OS chose (``TCPStore`` bound to
port 0 on 127.0.0.1, kept open until the workers are done), so no port is guessed and none can
be taken in between. Each worker runs ``tests.distributed.workers.<name>(rank, world_size)``
and its returned dict is written with ``torch.save``; the test reads them back. A worker that
raises fails the test with its traceback; a run that passes ``timeout`` seconds is killed.
"""

from __future__ import annotations

import datetime
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HOST = "127.0.0.1"


def _entry(rank: int, world_size: int, port: int, name: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no network needed
    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        worker = getattr(importlib.import_module("tests.distributed.workers"), name)
        result = worker(rank, world_size)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_workers(
    name: str, out_dir: Path, world_size: int = 2, timeout: float = 120.0
) -> list[dict[str, Any]]:
    """Run worker ``name`` on ``world_size`` gloo processes; return each rank's result dict.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a worker raised (with its traceback).
        TimeoutError: the workers did not finish within ``timeout`` seconds (they are killed).
    """
    store = dist.TCPStore(HOST, 0, None, is_master=True, wait_for_workers=False)
    context = mp.start_processes(
        _entry,
        args=(world_size, store.port, name, str(out_dir)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"distributed worker {name!r} ran past {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        del store
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]
