"""FoRA on the real packaged SmolLM2-135M with real Rotten Tomatoes reviews (a few minutes)."""

from __future__ import annotations

import pytest
import torch

from stiefel_peft.cli.assets import load_rotten_tomatoes, load_smollm2
from stiefel_peft.cli.encoding import ExampleCollator, label_words_for, split_examples
from stiefel_peft.fora import apply_fora, constrained_parameters, fora_optimizer
from stiefel_peft.geometry import orthogonality_error

pytestmark = pytest.mark.real_model


@torch.no_grad()
def _heldout_loss(model, batches) -> float:
    model.eval()
    return sum(model(**batch).loss.item() for batch in batches) / len(batches)


def test_fora_lowers_the_heldout_answer_loss_of_smollm2_after_a_few_steps() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    train, heldout = split_examples(load_rotten_tomatoes(), heldout=64, seed=0)
    collate = ExampleCollator(tokenizer, label_words_for(("negative", "positive")), max_length=64)
    heldout_batches = [collate(heldout[i : i + 16]) for i in range(0, 64, 16)]
    before = _heldout_loss(model, heldout_batches)

    calibration = [collate(train[i : i + 8]) for i in range(0, 16, 8)]
    model = apply_fora(model, 0.5, calibration=calibration, lora_dropout=0.0)
    report = model.fora_report
    assert len(report.selected_blocks) == 15 and report.num_blocks == 30
    assert report.adapter_parameters == 15 * 221_184  # r=32 on q,k,v,up,down of 15 blocks
    assert report.parameter_ratio == pytest.approx(0.5)
    # The adapter starts as the identity.
    assert _heldout_loss(model, heldout_batches) == pytest.approx(before, abs=1e-5)

    optimizer = fora_optimizer(model, lr=2e-3, stiefel_lr=2e-3)
    model.train()
    for step in range(12):
        batch = collate(train[16 + 8 * step : 24 + 8 * step])
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    after = _heldout_loss(model, heldout_batches)
    assert after < before - 0.05, (before, after)
    for _, parameter in constrained_parameters(model):
        assert orthogonality_error(parameter.detach()) <= 1e-5
