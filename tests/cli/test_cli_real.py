"""The main job's default path on the real model and data, with a reduced step count."""

from __future__ import annotations

from pathlib import Path

import pytest

from stiefel_peft.cli import main
from stiefel_peft.fora import FoRAReport

pytestmark = pytest.mark.real_model


def test_default_finetune_runs_on_smollm2_and_rotten_tomatoes(tmp_path: Path, capsys) -> None:
    output = tmp_path / "default"
    assert main(["finetune", "--steps", "3", "--output", str(output), "--quiet"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    report = FoRAReport.load(output)
    before, after = report.extra["accuracy_before"], report.extra["accuracy_after"]
    assert summary.startswith(f"accuracy {before:.3f} -> {after:.3f}")
    assert before > 0.6  # zero-shot above the majority class (58 % positive), as scored
    assert report.num_blocks == 30 and len(report.selected_blocks) == 15
    assert report.extra["heldout_examples"] == 300 and report.extra["model"] == "smollm2-135m"
    assert report.estimator == "empirical" and not report.data_free
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "fisher_scores.png",
        "run_config.json",
    ):
        assert (output / name).is_file(), name
