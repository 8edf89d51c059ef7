"""benchmarks/gpu_suite.py --small end to end on CPU: three sections, ratios, targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"
SECTIONS = ("optimizer", "train_step", "fisher")


def test_small_suite_writes_every_section_with_ratios_and_targets(tmp_path: Path) -> None:
    output = tmp_path / "gpu_suite.json"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["errors"] == {}
    assert report["small"] is True and report["environment"]["device"] == "cpu"
    for section in SECTIONS:
        assert section in report, section
        assert report[section]["targets"], section
    optimizer = report["optimizer"]["ratios"]
    assert {"tiny: stiefel-cayley/adamw", "tiny: geoopt/stiefel-cayley"} <= set(optimizer)
    kinds = report["optimizer"]["results"][0]["rows"]
    assert {"adamw", "geoopt", "stiefel-cayley", "stiefel-qr", "stiefel-polar"} <= set(kinds)
    train = report["train_step"]["ratios"]
    for key in (
        "fora/lora_same_blocks",
        "fora/lora_all_blocks",
        "fora/dora_all_blocks",
        "fora/lora_same_blocks memory",
    ):
        assert f"tiny: {key}" in train, key
    fisher = report["fisher"]["ratios"]
    assert "empirical/lora_step" in fisher and "empirical/lora_step memory" in fisher
    ratios = [*optimizer.values(), *train.values(), *fisher.values()]
    assert all(value > 0 and value == value for value in ratios)  # positive, not NaN
    targets = report["targets"]
    assert len(targets) == 6
    assert {row["status"] for row in targets} <= {"PASS", "MISS"}
    assert "| target | measured | limit | status |" in completed.stdout


def test_a_failing_part_still_writes_the_others(tmp_path: Path) -> None:
    output = tmp_path / "gpu_suite.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--small",
            "--device",
            "cpu",
            "--output",
            str(output),
            "--parts",
            "optimizer,no_such_part",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 1
    report = json.loads(output.read_text())
    assert "optimizer" in report and report["optimizer"]["ratios"]
    assert "no_such_part" in report["errors"]
