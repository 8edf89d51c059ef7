"""fora_optimizer inside a plain transformers.Trainer: accumulation, clipping, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from stiefel_peft.fora import apply_fora, constrained_parameters, fora_optimizer
from stiefel_peft.geometry import orthogonality_error
from tests.tiny_models import tiny_model_case

pytestmark = pytest.mark.slow

CASE = tiny_model_case("llama")


def _dataset(size: int = 16) -> list[dict[str, torch.Tensor]]:
    rows = []
    for seed in range(size):
        batch = CASE.make_batch(batch_size=1, seq_len=8, seed=100 + seed)
        rows.append({key: value[0] for key, value in batch.items()})
    return rows


def _trainer(output_dir: Path, max_steps: int) -> transformers.Trainer:
    calibration = [CASE.make_batch(batch_size=4, seq_len=8, seed=1)]
    model = apply_fora(CASE.build(seed=0), 0.5, calibration=calibration, r=4, lora_dropout=0.0)
    arguments = transformers.TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=max_steps,
        save_steps=3,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return transformers.Trainer(
        model=model,
        args=arguments,
        train_dataset=_dataset(),
        optimizers=(fora_optimizer(model, lr=5e-3, stiefel_lr=5e-3), None),
    )


def _adapter_state(trainer: transformers.Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".lora_" in n}


def test_trainer_with_accumulation_trains_and_resumes_on_the_identical_trajectory(tmp_path) -> None:
    straight = _trainer(tmp_path / "straight", max_steps=6)
    straight.train()
    expected = _adapter_state(straight)
    losses = [log["loss"] for log in straight.state.log_history if "loss" in log]
    assert len(losses) == 6
    for _, parameter in constrained_parameters(straight.model):
        assert orthogonality_error(parameter.detach()) <= 1e-5
    # The B factors really moved (the Stiefel step ran once per optimizer step).
    initial = _adapter_state(_trainer(tmp_path / "fresh", max_steps=6))
    moved = [n for n in expected if ".lora_B." in n and not torch.equal(expected[n], initial[n])]
    assert moved

    resumed = _trainer(tmp_path / "straight", max_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    actual = _adapter_state(resumed)
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0, msg=name)
