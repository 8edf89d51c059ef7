"""Tangent projection, Riemannian gradients, metrics and vector transports."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from stiefel_peft.geometry import (
    inner,
    project_tangent,
    random_stiefel,
    retract,
    riemannian_gradient,
    transport,
    transport_differentiated,
)
from tests.geometry.strategies import point_and_tangent


def _tangent_defect(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (x.mT @ v + v.mT @ x).norm(dim=(-2, -1))


@given(data=point_and_tangent())
@settings(max_examples=30, deadline=None)
def test_projection_is_idempotent_and_tangent(data) -> None:
    x, _ = data
    ambient = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    once = project_tangent(x, ambient)
    assert _tangent_defect(x, once).max() <= 1e-12
    torch.testing.assert_close(project_tangent(x, once), once, atol=1e-12, rtol=0)
    # The residual is orthogonal to every tangent vector (it is x times a symmetric matrix).
    residual = ambient - once
    assert (residual * once).sum().abs() <= 1e-10 * (1 + ambient.norm() ** 2)


def _objective(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Brockett-style cost tr(x^T A x B), summed over the batch.
    return ((x.mT @ a @ x) * b).sum()


@pytest.mark.parametrize("metric", ["euclidean", "canonical"])
@given(data=point_and_tangent())
@settings(max_examples=20, deadline=None)
def test_riemannian_gradient_matches_a_finite_difference(metric: str, data) -> None:
    x, _ = data
    generator = torch.Generator().manual_seed(5)
    xi = project_tangent(x, torch.randn(x.shape, dtype=x.dtype, generator=generator))
    n, p = x.shape[-2:]
    a = torch.randn(n, n, dtype=x.dtype, generator=generator)
    b = torch.randn(p, p, dtype=x.dtype, generator=generator)
    point = x.clone().requires_grad_(True)
    (egrad,) = torch.autograd.grad(_objective(point, a, b), point)
    rgrad = riemannian_gradient(x, egrad, metric)
    assert _tangent_defect(x, rgrad).max() <= 1e-9 * (1 + egrad.norm())
    h = 1e-6
    derivative = (
        _objective(retract(x, h * xi, "cayley"), a, b)
        - _objective(retract(x, -h * xi, "cayley"), a, b)
    ) / (2 * h)
    predicted = inner(x, rgrad, xi, metric).sum()
    assert abs(derivative - predicted) <= 1e-5 * (1 + abs(derivative))


def test_canonical_metric_matches_its_dense_definition() -> None:
    generator = torch.Generator().manual_seed(6)
    x = random_stiefel(12, 3, dtype=torch.float64, generator=generator)
    u = project_tangent(x, torch.randn(12, 3, dtype=torch.float64, generator=generator))
    v = project_tangent(x, torch.randn(12, 3, dtype=torch.float64, generator=generator))
    dense = torch.trace(u.mT @ (torch.eye(12, dtype=torch.float64) - 0.5 * x @ x.mT) @ v)
    torch.testing.assert_close(inner(x, u, v, "canonical"), dense)
    torch.testing.assert_close(inner(x, u, v, "euclidean"), torch.trace(u.mT @ v))


@given(data=point_and_tangent())
@settings(max_examples=20, deadline=None)
def test_projection_transport_lands_in_the_target_tangent_space(data) -> None:
    x, v = data
    y = retract(x, v, "qr")
    moved = transport(x, y, v)
    assert _tangent_defect(y, moved).max() <= 1e-12


@pytest.mark.parametrize("method", ["qr", "cayley", "polar", "exp"])
@given(data=point_and_tangent(max_norm=1.5))
@settings(max_examples=15, deadline=None)
def test_differentiated_transport_matches_a_finite_difference_and_is_tangent(
    method: str, data
) -> None:
    x, u = data
    v = project_tangent(
        x, torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(7))
    )
    moved = transport_differentiated(x, u, v, retraction=method)
    h = 1e-6
    finite = (retract(x, u + h * v, method) - retract(x, u - h * v, method)) / (2 * h)
    torch.testing.assert_close(moved, finite, atol=1e-6 * (1 + float(v.norm())), rtol=1e-6)
    assert _tangent_defect(retract(x, u, method), moved).max() <= 1e-9 * (1 + v.norm())


@pytest.mark.parametrize("method", ["qr", "cayley"])
def test_closed_form_transports_agree_with_forward_mode_autodiff(method: str) -> None:
    generator = torch.Generator().manual_seed(8)
    x = random_stiefel(2, 25, 5, dtype=torch.float64, generator=generator)
    u = project_tangent(x, 0.5 * torch.randn(2, 25, 5, dtype=torch.float64, generator=generator))
    v = project_tangent(x, torch.randn(2, 25, 5, dtype=torch.float64, generator=generator))
    _, reference = torch.func.jvp(lambda step: retract(x, step, method), (u,), (v,))
    torch.testing.assert_close(
        transport_differentiated(x, u, v, method), reference, atol=1e-11, rtol=0
    )


def test_differentiated_transport_at_zero_step_is_the_identity_on_tangents() -> None:
    generator = torch.Generator().manual_seed(9)
    x = random_stiefel(15, 4, dtype=torch.float64, generator=generator)
    v = project_tangent(x, torch.randn(15, 4, dtype=torch.float64, generator=generator))
    for method in ("qr", "cayley", "polar", "exp"):
        torch.testing.assert_close(
            transport_differentiated(x, torch.zeros_like(x), v, method), v, atol=1e-11, rtol=0
        )
