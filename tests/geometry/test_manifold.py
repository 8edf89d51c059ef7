"""The geoopt Manifold: interoperability with geoopt's parameters and optimizers."""

from __future__ import annotations

import geoopt
import pytest
import torch

from stiefel_peft.geometry import (
    RETRACTIONS,
    Stiefel,
    orthogonality_error,
    project_tangent,
    random_stiefel,
)
from stiefel_peft.geometry.retractions import geodesic_canonical, retract_exp


def _top_eigenspace_problem(n: int = 20, p: int = 3, seed: int = 0) -> tuple[torch.Tensor, float]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    a = a + a.mT
    best = torch.linalg.eigvalsh(a)[-p:].sum().item()
    return a, best


@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
@pytest.mark.parametrize("retraction", ["cayley", "qr", "polar"])
@pytest.mark.parametrize("metric", ["euclidean", "canonical"])
def test_geoopt_optimizers_solve_brockett_on_our_manifold(
    optimizer_name, retraction, metric
) -> None:
    a, best = _top_eigenspace_problem()
    manifold = Stiefel(retraction=retraction, metric=metric)
    x = geoopt.ManifoldParameter(
        random_stiefel(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
        manifold=manifold,
    )
    if optimizer_name == "adam":
        optimizer = geoopt.optim.RiemannianAdam([x], lr=0.05)
    else:
        optimizer = geoopt.optim.RiemannianSGD([x], lr=0.02, momentum=0.5)
    for _ in range(400):
        optimizer.zero_grad()
        loss = -torch.trace(x.mT @ a @ x)
        loss.backward()
        optimizer.step()
    assert orthogonality_error(x.detach()) <= 1e-10
    assert -loss.item() >= best - 1e-3 * abs(best)


def test_manifold_checks_points_and_tangents() -> None:
    manifold = Stiefel()
    x = random_stiefel(8, 3, dtype=torch.float64)
    assert manifold.check_point_on_manifold(x)
    assert not manifold.check_point_on_manifold(2 * x)
    v = project_tangent(x, torch.randn(8, 3, dtype=torch.float64))
    assert manifold.check_vector_on_tangent(x, v)
    assert not manifold.check_vector_on_tangent(x, x)
    assert not manifold._check_shape((3, 8), "x")[0]


def test_manifold_rejects_unknown_settings() -> None:
    with pytest.raises(ValueError, match="`method`"):
        Stiefel(retraction="nope")
    with pytest.raises(ValueError, match="`metric`"):
        Stiefel(metric="nope")


def test_random_origin_and_projx() -> None:
    manifold = Stiefel()
    point = manifold.random(4, 10, 2, dtype=torch.float64)
    assert isinstance(point, geoopt.ManifoldTensor) and point.manifold is manifold
    assert orthogonality_error(point).max() < 1e-12
    origin = manifold.origin(10, 2, dtype=torch.float64)
    assert orthogonality_error(origin) == 0
    assert orthogonality_error(manifold.projx(torch.randn(10, 2, dtype=torch.float64))) < 1e-12


def test_expmap_follows_each_metric() -> None:
    x = random_stiefel(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    v = project_tangent(
        x, 0.3 * torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    )
    torch.testing.assert_close(Stiefel(metric="euclidean").expmap(x, v), retract_exp(x, v))
    canonical = Stiefel(metric="canonical").expmap(x, v)
    assert orthogonality_error(canonical) < 1e-12
    # Initial velocity v for the canonical geodesic.
    h = 1e-6
    velocity = (geodesic_canonical(x, h * v) - geodesic_canonical(x, -h * v)) / (2 * h)
    torch.testing.assert_close(velocity, v, atol=1e-7, rtol=0)
    # On the orthogonal group (p = n) both metrics are proportional: same geodesics.
    square = random_stiefel(5, 5, dtype=torch.float64)
    w = project_tangent(square, torch.randn(5, 5, dtype=torch.float64))
    torch.testing.assert_close(
        geodesic_canonical(square, w), retract_exp(square, w), atol=1e-10, rtol=0
    )


def test_every_registered_retraction_works_through_the_manifold() -> None:
    x = random_stiefel(9, 2, dtype=torch.float64)
    v = project_tangent(x, 1e-3 * torch.randn(9, 2, dtype=torch.float64))
    for name in RETRACTIONS:
        assert orthogonality_error(Stiefel(retraction=name).retr(x, v)) < 1e-6
