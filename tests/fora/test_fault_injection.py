"""Fault injection: NaN gradients every few steps during FoRA training on a tiny model.

Every factor ends finite and orthonormal, and the optimizer's skip count equals the number of
injected faults (one factor's gradient poisoned each time; the others keep training).
"""

from __future__ import annotations

import math

import torch

from stiefel_peft.fora import apply_fora, constrained_parameters, fora_optimizer
from stiefel_peft.geometry import orthogonality_error
from tests.tiny_models import tiny_model_case
from tests.tolerances import orthonormal_tolerance


def test_injected_nan_gradients_are_skipped_and_counted() -> None:
    case = tiny_model_case("llama")
    calibration = [case.make_batch(batch_size=3, seq_len=8, seed=seed) for seed in range(2)]
    model = apply_fora(case.build(seed=0), 0.5, calibration=calibration, r=4, lora_dropout=0.0)
    optimizer = fora_optimizer(model, lr=1e-2, stiefel_lr=1e-2)
    factors = [param for _, param in constrained_parameters(model)]
    batch = case.make_batch(batch_size=4, seq_len=8, seed=11)
    generator = torch.Generator().manual_seed(0)
    injected, losses = 0, []
    model.train()
    for step in range(40):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        if step % 3 == 1:  # every third step, one random entry of one random factor
            victim = factors[int(torch.randint(len(factors), (1,), generator=generator))]
            row = int(torch.randint(victim.shape[0], (1,), generator=generator))
            victim.grad[row, 0] = math.nan if step % 2 else math.inf
            injected += 1
        optimizer.step()
        losses.append(loss.item())
    assert optimizer.nonfinite_skips() == injected == 13
    for factor in factors:
        assert torch.isfinite(factor).all()
        assert orthogonality_error(factor.detach()) <= orthonormal_tolerance(torch.float32, 4)
    assert all(math.isfinite(value) for value in losses)
    assert losses[-1] < 0.95 * losses[0]  # the other factors kept training
