"""The quality runner on CUDA: the smoke config end to end with --device cuda, every record
saying it ran there and holding finite metrics. Skipped without CUDA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from experiments import run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SMOKE = Path(run.__file__).resolve().parent / "configs" / "smoke.json"


def test_smoke_config_runs_on_cuda(tmp_path: Path) -> None:
    counts = run.main([str(SMOKE), "--device", "cuda", "--results", str(tmp_path), "--quiet"])
    assert counts["trained"] == counts["total"] == 4
    for path in sorted((tmp_path / "smoke").glob("*.json")):
        record = json.loads(path.read_text())
        assert record["device"].startswith("cuda"), path.name
        assert math.isfinite(record["after"]) and math.isfinite(record["effective_rank_mean"])
        assert all(math.isfinite(loss) for loss in record["last_losses"])
