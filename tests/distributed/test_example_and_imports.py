"""The torchrun example runs on 2 CPU processes; the core layers do not import this one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "accelerate_fora.py"


@pytest.mark.distributed
def test_torchrun_example_trains_identical_replicas() -> None:
    # --standalone: torchrun's own rendezvous on a free localhost port
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(EXAMPLE), "--steps", "6"]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A new session, so that on a timeout the workers die with torchrun instead of lingering.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in 240 s:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
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
