"""The torchrun example runs on 2 CPU processes; the core layers do not import this one."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "accelerate_fora.py"


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.distributed
def test_torchrun_example_trains_identical_replicas() -> None:
    # --standalone: torchrun's own rendezvous on a free localhost port
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(EXAMPLE), "--steps", "6"]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Output goes to files, not pipes: a worker that outlives torchrun must not keep the test
    # waiting for end-of-file. Every descendant still alive afterwards is killed.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=environment)
        parent = psutil.Process(process.pid)
        seen: dict[int, psutil.Process] = {}
        deadline = time.monotonic() + 240
        try:
            while process.poll() is None and time.monotonic() < deadline:
                seen.update({child.pid: child for child in _descendants(parent)})
                time.sleep(0.2)
            if process.poll() is None:
                process.kill()
                process.wait()
        finally:
            for child in seen.values():
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ddp, 2 process(es), optimizer StiefelAdam" in result.stdout, result.stdout
    match = re.search(
        r"loss ([\d.]+) -> ([\d.]+); largest \|\|x\^T x - I\|\| = ([\d.e+-]+); ranks agree: (\w+)",
        result.stdout,
    )
    assert match, result.stdout
    first, last, error = (float(value) for value in match.groups()[:3])
    assert last < first and error <= 1e-5 and match.group(4) == "True"


def test_core_layers_do_not_import_the_distributed_layer() -> None:
    code = ("import sys, stiefel_peft.geometry, stiefel_peft.optim, stiefel_peft.fisher; "
            "print('stiefel_peft.distributed' in sys.modules)")  # fmt: skip
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120)  # fmt: skip
    assert output.stdout.split() == ["False"]
