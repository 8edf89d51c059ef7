"""The study's gradient-scaled rate (experiments.rates): g, the RMS of the free factors' mean
gradient, and c / sqrt(g)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from experiments.rates import free_factor_gradient_rms, gradient_scaled_rate
from stiefel_peft.fora import apply_fora
from tests.tiny_models import tiny_model_case

RANK = 4


def _adapted(seed: int = 0, **overrides) -> nn.Module:
    model = tiny_model_case("llama").build(seed=seed)
    return apply_fora(model, 1.0, r=RANK, lora_dropout=0.1, **overrides)


def _batches(count: int = 3) -> list[dict[str, torch.Tensor]]:
    case = tiny_model_case("llama")
    return [case.make_batch(batch_size=2, seq_len=6, seed=20 + k) for k in range(count)]


def _reference(model: nn.Module, batches: list[dict], factor: str) -> float:
    """The same statistic by .backward() on each batch, in eval mode, summed in float64."""
    model.eval()
    names = [n for n, p in model.named_parameters() if f".lora_{factor}." in n and p.requires_grad]
    parameters = dict(model.named_parameters())
    total = {name: torch.zeros_like(parameters[name], dtype=torch.float64) for name in names}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for name in names:
            total[name] += parameters[name].grad.double()
    model.zero_grad(set_to_none=True)
    mean = torch.cat([t.flatten() for t in total.values()]) / len(batches)
    return float(mean.pow(2).mean().sqrt())


@pytest.mark.parametrize("stiefel_factor", ["B", "A"])
def test_g_is_the_rms_of_the_free_factors_mean_gradient(stiefel_factor: str) -> None:
    free = "A" if stiefel_factor == "B" else "B"
    model = _adapted(stiefel_factor=stiefel_factor)
    batches = _batches()
    value = free_factor_gradient_rms(model, batches, free, "default")
    assert value > 0
    assert value == pytest.approx(_reference(model, batches, free), rel=1e-6)


def test_it_writes_no_grad_and_restores_the_mode() -> None:
    model = _adapted()
    model.train()
    first = free_factor_gradient_rms(model, _batches(), "A", "default")
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    # eval mode inside: dropout (0.1 here) does not make the statistic random
    assert free_factor_gradient_rms(model, _batches(), "A", "default") == first


def test_the_rate_is_c_over_the_square_root_of_g_and_falls_as_the_pull_grows() -> None:
    model, batches = _adapted(), _batches()
    g = free_factor_gradient_rms(model, batches, "A", "default")
    assert gradient_scaled_rate(model, batches, 9e-5) == pytest.approx(9e-5 / math.sqrt(g))

    class Scaled(nn.Module):  # the same model with its loss times 4: g times 4, rate halved
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **batch: torch.Tensor):
            output = self.inner(**batch)
            output.loss = 4 * output.loss
            return output

    scaled = gradient_scaled_rate(Scaled(model), batches, 9e-5)
    assert scaled == pytest.approx(gradient_scaled_rate(model, batches, 9e-5) / 2, rel=1e-5)


@pytest.mark.parametrize("bad", [0.0, -1e-4, float("nan"), float("inf"), True])
def test_a_bad_constant_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="gradient_lr"):
        gradient_scaled_rate(_adapted(), _batches(1), bad)


def test_unusable_inputs_are_refused_with_the_fix() -> None:
    model = _adapted()
    with pytest.raises(ValueError, match="at least one batch"):
        free_factor_gradient_rms(model, [], "A", "default")
    unlabelled = [{k: v for k, v in _batches(1)[0].items() if k != "labels"}]
    with pytest.raises(ValueError, match="batches with labels"):
        free_factor_gradient_rms(model, unlabelled, "A", "default")
    with pytest.raises(ValueError, match="no trainable lora_A weights of adapter 'other'"):
        free_factor_gradient_rms(model, _batches(1), "A", "other")
    base = tiny_model_case("llama").build(seed=0)
    for parameter in base.parameters():  # a model whose output does not depend on A
        parameter.requires_grad_(False)
    frozen = apply_fora(base, 1.0, r=RANK)
    for name, parameter in frozen.named_parameters():
        if ".lora_B." in name:  # B = 0: no gradient reaches A
            with torch.no_grad():
                parameter.zero_()
    with pytest.raises(ValueError, match="non-zero gradient; pass an absolute lr"):
        free_factor_gradient_rms(frozen, _batches(1), "A", "default")
