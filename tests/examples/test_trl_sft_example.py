"""FoRA under TRL's SFTTrainer: the example runs in its fast mode and shows what it claims."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trl_sft.py"


def test_sft_trainer_trains_a_fora_adapter_with_the_stiefel_optimizer() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--fast"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(
        r"loss ([\d.]+) -> ([\d.]+); largest \|\|B\^T B - I\|\| = ([\d.e+-]+)", result.stdout
    )
    assert match, result.stdout
    first, last, error = map(float, match.groups())
    assert last < first and error <= 1e-5
    assert "trained 30 optimizer steps with StiefelAdam" in result.stdout
    assert "'adapter_model.safetensors'" in result.stdout and "'fora_config.json'" in result.stdout
