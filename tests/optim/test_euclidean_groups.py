"""Euclidean groups (stiefel=False) equal torch.optim.AdamW / SGD step for step."""

from __future__ import annotations

import pytest
import torch

from stiefel_peft.geometry import random_stiefel
from stiefel_peft.optim import StiefelAdam, StiefelSGD


def _params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (5,), (4, 4, 2), (1,)]
    return [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]


def _run_pair(ours, reference, params, twins, steps: int = 60) -> None:
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        for a, b in zip(params, twins, strict=True):
            grad = torch.randn(a.shape, generator=generator)
            # a parameter without a gradient on some steps is skipped by both
            a.grad = None if (step % 7 == 3 and a.dim() == 1) else grad
            b.grad = None if a.grad is None else grad.clone()
        ours.step()
        reference.step()
        for a, b in zip(params, twins, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("foreach", [None, True])
def test_adam_euclidean_group_equals_adamw(maximize: bool, foreach: bool | None) -> None:
    params = _params(0)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    options = {"lr": 2e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    ours = StiefelAdam(params, stiefel=False, maximize=maximize, foreach=foreach, **options)
    reference = torch.optim.AdamW(twins, maximize=maximize, foreach=foreach, **options)
    _run_pair(ours, reference, params, twins)


@pytest.mark.parametrize(
    "options",
    [
        {"lr": 0.05},
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
        {"lr": 0.05, "momentum": 0.5, "dampening": 0.3, "maximize": True},
    ],
)
def test_sgd_euclidean_group_equals_sgd(options: dict) -> None:
    params = _params(1)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = StiefelSGD(params, stiefel=False, **options)
    reference = torch.optim.SGD(twins, **options)
    _run_pair(ours, reference, params, twins)


def test_mixed_groups_fora_layout() -> None:
    """B in a Stiefel group (lr 1e-3), the rest in an AdamW group (lr 2e-4) of one optimizer."""
    generator = torch.Generator().manual_seed(2)
    b = torch.nn.Parameter(random_stiefel(12, 4, generator=generator))
    a = torch.nn.Parameter(torch.randn(4, 9, generator=generator))
    a_twin = torch.nn.Parameter(a.detach().clone())
    optimizer = StiefelAdam(
        [
            {"params": [b], "lr": 1e-3},
            {"params": [a], "stiefel": False, "lr": 2e-4, "weight_decay": 0.01},
        ]
    )
    reference = torch.optim.AdamW([a_twin], lr=2e-4, weight_decay=0.01)
    for _ in range(20):
        grad = torch.randn(a.shape, generator=generator)
        a.grad, a_twin.grad = grad, grad.clone()
        b.grad = torch.randn(b.shape, generator=generator)
        optimizer.step()
        reference.step()
    torch.testing.assert_close(a, a_twin, rtol=0, atol=1e-7)
    eye = torch.eye(4)
    torch.testing.assert_close(b.detach().T @ b.detach(), eye, rtol=0, atol=1e-5)
