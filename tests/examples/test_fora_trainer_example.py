"""The FoRA + Trainer example runs in its fast mode and shows what it claims."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fora_trainer.py"


def test_fora_trainer_example_trains_keeps_b_orthonormal_and_reloads() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--fast"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loss = re.search(
        r"loss ([\d.]+) -> ([\d.]+); largest \|\|B\^T B - I\|\| = ([\d.e+-]+)", result.stdout
    )
    assert loss, result.stdout
    first, last, error = map(float, loss.groups())
    assert last < first and error <= 1e-5
    difference = float(re.search(r"max logit difference ([\d.e+-]+)", result.stdout).group(1))
    assert difference <= 1e-5
