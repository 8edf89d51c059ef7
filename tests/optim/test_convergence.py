"""Convergence on problems with known solutions, for every registered retraction."""

from __future__ import annotations

import pytest
import torch

from stiefel_peft.geometry import RETRACTIONS, orthonormalize, random_stiefel
from stiefel_peft.optim import SECOND_MOMENTS, RiemannianWrapper, StiefelAdam, StiefelSGD

from .problems import train_brockett


@pytest.mark.parametrize("second_moment", SECOND_MOMENTS)
@pytest.mark.parametrize("retraction", sorted(RETRACTIONS))
def test_adam_finds_top_eigenspace(retraction: str, second_moment: str) -> None:
    distance = train_brockett(
        lambda ps: StiefelAdam(ps, lr=0.1, retraction=retraction, second_moment=second_moment),
        steps=400,
        gamma=0.99,
    )
    assert distance < 1e-4


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("retraction", sorted(RETRACTIONS))
def test_sgd_finds_top_eigenspace(retraction: str, nesterov: bool) -> None:
    distance = train_brockett(
        lambda ps: StiefelSGD(ps, lr=0.05, momentum=0.9, nesterov=nesterov, retraction=retraction),
        steps=300,
        gamma=1.0,
    )
    assert distance < 1e-4


@pytest.mark.parametrize("retraction", ["polar", "qr", "cayley"])
def test_wrapped_sgd_finds_top_eigenspace(retraction: str) -> None:
    distance = train_brockett(
        lambda ps: RiemannianWrapper(torch.optim.SGD(ps, lr=0.1, momentum=0.9), retraction),
        steps=300,
        gamma=1.0,
    )
    assert distance < 1e-4


def test_sgd_solves_procrustes() -> None:
    """min ||x - m||_F^2 on St(n, p) is solved by the polar factor of m."""
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(15, 4, dtype=torch.float64, generator=generator)
    x = torch.nn.Parameter(random_stiefel(15, 4, dtype=torch.float64, generator=generator))
    optimizer = StiefelSGD([x], lr=0.05, momentum=0.5)
    for _ in range(300):
        x.grad = 2.0 * (x.detach() - target)
        optimizer.step()
    assert torch.allclose(x.detach(), orthonormalize(target), atol=1e-8)


def test_maximize_ascends() -> None:
    """maximize=True with the gradient of +tr(x^T a x) reaches the same eigenspace."""
    from .problems import brockett, subspace_distance

    a, top, x0 = brockett(20, 3)
    x = torch.nn.Parameter(x0.clone())
    optimizer = StiefelSGD([x], lr=0.1, momentum=0.9, maximize=True)
    for _ in range(300):
        x.grad = 2.0 * a @ x.detach()
        optimizer.step()
    assert subspace_distance(x.detach(), top) < 1e-4
