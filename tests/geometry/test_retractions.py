"""Properties of every registered retraction (hypothesis) and float64 reference checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stiefel_peft.geometry import (
    RETRACTIONS,
    approximation_tolerance,
    orthogonality_error,
    orthonormalize,
    project_tangent,
    random_stiefel,
    retract,
    retract_cayley,
    retract_cayley_iterative,
    retract_exp,
    retract_polar,
    retract_polar_newton_schulz,
)
from tests.geometry.strategies import point_and_tangent
from tests.tolerances import CLOSE, retraction_tolerance

BUILT_IN = ("qr", "cayley", "cayley_iterative", "polar", "polar_newton_schulz", "exp")
EXACT = ("qr", "cayley", "polar", "exp")  # land on the manifold for any step size
APPROXIMATE = ("cayley_iterative", "polar_newton_schulz")


def test_registry_holds_the_built_in_retractions() -> None:
    assert set(BUILT_IN) <= set(RETRACTIONS)


def _working(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@pytest.mark.parametrize("method", EXACT)
@given(data=point_and_tangent(dtype=None, max_norm=2.0, production=True))
@settings(max_examples=25, deadline=None)
def test_exact_retractions_land_on_the_manifold(method: str, data) -> None:
    x, v = data
    y = retract(x, v, method)
    assert y.shape == x.shape and y.dtype == x.dtype
    # no worse than the point's own rounding plus what computing and rounding y may add
    bound = orthogonality_error(x) + retraction_tolerance(x.dtype, x.shape[-1])
    assert (orthogonality_error(y) <= bound).all()


@pytest.mark.parametrize("method", APPROXIMATE)
@given(
    data=point_and_tangent(dtype=None, max_norm=4.0, production=True),
    scale=st.sampled_from([1e-3, 1e-1, 1.0]),
)
@settings(max_examples=25, deadline=None)
def test_approximate_retractions_stay_on_the_manifold_at_any_step(method, data, scale) -> None:
    # small steps keep the matmul-only result; a large one falls back on the exact map
    x, v = data
    y = retract(x, scale * v, method)
    p = x.shape[-1]
    accepted = approximation_tolerance(_working(x.dtype), p)
    bound = orthogonality_error(x) + accepted + retraction_tolerance(x.dtype, p)
    assert (orthogonality_error(y) <= bound).all()


@pytest.mark.parametrize("method", APPROXIMATE)
def test_approximate_retractions_keep_the_matmul_result_for_small_steps(method: str) -> None:
    generator = torch.Generator().manual_seed(12)
    x = random_stiefel(3, 576, 32, generator=generator)  # float32, a FoRA factor's shape
    v = project_tangent(x, 1e-3 * torch.randn(3, 576, 32, generator=generator))
    unchecked = retract(x, v, method, tolerance=float("inf"))  # the raw iteration
    torch.testing.assert_close(retract(x, v, method), unchecked, atol=0, rtol=0)


@pytest.mark.parametrize("method", APPROXIMATE)
def test_unit_steps_need_the_fallback(method: str) -> None:
    # geoopt's manifold suite steps by a unit-scale tangent: the raw iterations fail there
    generator = torch.Generator().manual_seed(13)
    x = random_stiefel(4, 10, 5, dtype=torch.float64, generator=generator)
    v = project_tangent(x, 3.0 * torch.randn(4, 10, 5, dtype=torch.float64, generator=generator))
    options = {"iterations": 2} if method == "cayley_iterative" else {"steps": 2}
    raw = retract(x, v, method, tolerance=float("inf"), **options)
    assert orthogonality_error(raw).max() > 1e-3
    checked = retract(x, v, method, **options)
    assert orthogonality_error(checked).max() <= 1e-12
    exact = retract(x, v, "cayley" if method == "cayley_iterative" else "polar")
    torch.testing.assert_close(checked, exact, atol=1e-12, rtol=0)


def test_tolerance_option_is_checked() -> None:
    x = random_stiefel(6, 2, dtype=torch.float64)
    for method in APPROXIMATE:
        with pytest.raises(ValueError, match="`tolerance` must be a positive number"):
            retract(x, torch.zeros_like(x), method, tolerance=0.0)


@pytest.mark.parametrize("method", BUILT_IN)
@given(data=point_and_tangent())
@settings(max_examples=15, deadline=None)
def test_zero_step_is_the_identity(method: str, data) -> None:
    x, _ = data
    y = retract(x, torch.zeros_like(x), method)
    torch.testing.assert_close(y, x, atol=CLOSE[torch.float64], rtol=0)


@pytest.mark.parametrize("method", BUILT_IN)
@given(data=point_and_tangent(max_norm=1.0))
@settings(max_examples=15, deadline=None)
def test_first_order_agreement_has_slope_two(method: str, data) -> None:
    # R(x, t v) = x + t v + O(t^2): halving t divides the remainder by about four. The
    # strategy never draws St(1, 1), so the unit tangent direction exists.
    x, _ = data
    generator = torch.Generator().manual_seed(11)
    direction = project_tangent(x, torch.randn(x.shape, dtype=x.dtype, generator=generator))
    direction = direction / direction.norm(dim=(-2, -1), keepdim=True)
    remainders = []
    for t in (1e-2, 5e-3, 2.5e-3):
        remainders.append((retract(x, t * direction, method) - x - t * direction).norm())
    slopes = [math.log2(remainders[i] / remainders[i + 1]) for i in range(2)]
    assert all(1.8 <= slope <= 2.2 for slope in slopes), slopes


@pytest.mark.parametrize("method", BUILT_IN)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_return_their_dtype_on_the_manifold(method: str, dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    x = random_stiefel(3, 64, 8, dtype=torch.float64, generator=generator)
    v = project_tangent(x, torch.randn(3, 64, 8, dtype=torch.float64, generator=generator))
    v = 0.5 * v / v.norm(dim=(-2, -1), keepdim=True)  # a large step: ||v||_F = 0.5 per frame
    x, v = x.to(dtype), v.to(dtype)
    y = retract(x, v, method)
    assert y.dtype == dtype
    bound = orthogonality_error(x) + retraction_tolerance(dtype, 8)
    assert (orthogonality_error(y) <= bound).all()
    # the bound is tight enough to catch a "retraction" that forgets to retract
    assert (orthogonality_error(x + v) > bound).all()


def _dense_cayley(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # The textbook n x n form, for reference only.
    n = x.shape[-2]
    eye = torch.eye(n, dtype=x.dtype)
    projector = eye - 0.5 * x @ x.mT
    w = projector @ v @ x.mT - x @ v.mT @ projector  # (n, n) skew
    return torch.linalg.solve(eye - 0.5 * w, (eye + 0.5 * w) @ x)


@given(data=point_and_tangent(max_norm=3.0, production=False))
@settings(max_examples=25, deadline=None)
def test_cayley_matches_the_dense_n_by_n_reference(data) -> None:
    x, v = data
    expected = torch.stack(
        [
            _dense_cayley(a, b)
            for a, b in zip(x.reshape(-1, *x.shape[-2:]), v.reshape(-1, *x.shape[-2:]), strict=True)
        ]
    )
    torch.testing.assert_close(
        retract_cayley(x, v).reshape(expected.shape), expected, atol=1e-10, rtol=0
    )


def test_cayley_iteration_converges_to_the_exact_cayley_point() -> None:
    generator = torch.Generator().manual_seed(2)
    x = random_stiefel(4, 50, 6, dtype=torch.float64, generator=generator)
    v = project_tangent(x, 0.02 * torch.randn(4, 50, 6, dtype=torch.float64, generator=generator))
    exact = retract_cayley(x, v)
    errors = [
        (retract_cayley_iterative(x, v, iterations=k, tolerance=math.inf) - exact).norm()
        for k in (1, 4, 12)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-9


@given(data=point_and_tangent(max_norm=2.0))
@settings(max_examples=25, deadline=None)
def test_polar_is_the_svd_nearest_point(data) -> None:
    x, v = data
    y = retract_polar(x, v)
    target = x + v
    torch.testing.assert_close(y, orthonormalize(target), atol=1e-9, rtol=0)
    # No other point we can produce is closer to x + v.
    for method in ("qr", "cayley", "exp"):
        other = retract(x, v, method)
        assert ((y - target).norm(dim=(-2, -1)) <= (other - target).norm(dim=(-2, -1)) + 1e-9).all()


@given(data=point_and_tangent(max_norm=0.5))
@settings(max_examples=25, deadline=None)
def test_newton_schulz_polar_matches_svd_polar(data) -> None:
    x, v = data
    torch.testing.assert_close(
        retract_polar_newton_schulz(x, v), retract_polar(x, v), atol=1e-8, rtol=0
    )


@given(data=point_and_tangent(max_norm=2.0))
@settings(max_examples=20, deadline=None)
def test_exp_is_a_geodesic_of_the_embedded_metric(data) -> None:
    # A geodesic of the induced metric has acceleration normal to the manifold.
    x, v = data
    h = 1e-3
    for t in (0.3, 0.7):
        before, here, after = (retract_exp(x, s * v) for s in (t - h, t, t + h))
        acceleration = (after - 2 * here + before) / h**2
        tangential = project_tangent(here, acceleration)
        assert tangential.norm() <= 1e-4 * (1 + acceleration.norm())
        # Constant speed along a geodesic.
        speed = ((after - before) / (2 * h)).norm(dim=(-2, -1))
        torch.testing.assert_close(speed, v.norm(dim=(-2, -1)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", BUILT_IN)
def test_retractions_broadcast_over_batch_dims(method: str) -> None:
    generator = torch.Generator().manual_seed(3)
    x = random_stiefel(2, 3, 20, 4, dtype=torch.float64, generator=generator)
    v = project_tangent(
        x, 0.05 * torch.randn(2, 3, 20, 4, dtype=torch.float64, generator=generator)
    )
    batched = retract(x, v, method)
    one_by_one = torch.stack(
        [
            retract(a, b, method)
            for a, b in zip(x.reshape(6, 20, 4), v.reshape(6, 20, 4), strict=True)
        ]
    )
    torch.testing.assert_close(batched.reshape(6, 20, 4), one_by_one, atol=1e-12, rtol=0)


@given(steps=st.integers(1, 3))
@settings(max_examples=3, deadline=None)
def test_newton_schulz_accuracy_grows_with_steps(steps: int) -> None:
    generator = torch.Generator().manual_seed(4)
    x = random_stiefel(30, 5, dtype=torch.float64, generator=generator)
    v = project_tangent(x, 0.3 * torch.randn(30, 5, dtype=torch.float64, generator=generator))
    fewer = orthogonality_error(retract_polar_newton_schulz(x, v, steps=steps, tolerance=math.inf))
    more = orthogonality_error(
        retract_polar_newton_schulz(x, v, steps=steps + 1, tolerance=math.inf)
    )
    assert more < fewer or more < 1e-14
