"""Frames (random, orthonormalize, error) and the error messages of every public function."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stiefel_peft.geometry import (
    inner,
    orthogonality_error,
    orthonormalize,
    project_tangent,
    random_stiefel,
    register_retraction,
    retract,
    retract_cayley_iterative,
    retract_polar_newton_schulz,
    riemannian_gradient,
    transport,
    transport_differentiated,
)
from tests.geometry.strategies import frame_shapes
from tests.tolerances import orthonormal_tolerance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@given(shape=frame_shapes())
@settings(max_examples=10, deadline=None)
def test_random_stiefel_is_orthonormal_in_every_dtype(dtype, shape) -> None:
    x = random_stiefel(*shape, dtype=dtype)
    assert x.shape == shape and x.dtype == dtype
    assert orthogonality_error(x).max() <= orthonormal_tolerance(dtype, shape[-1])


def test_random_stiefel_is_reproducible_with_a_generator_and_accepts_a_tuple() -> None:
    first = random_stiefel(10, 3, generator=torch.Generator().manual_seed(0))
    second = random_stiefel((10, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, second)


@given(shape=frame_shapes(), seed=st.integers(0, 1000))
@settings(max_examples=20, deadline=None)
def test_orthonormalize_returns_the_nearest_frame_and_fixes_points(shape, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, dtype=torch.float64, generator=generator)
    q = orthonormalize(a)
    assert orthogonality_error(q).max() <= 1e-12
    # Nearer to a than a random frame and than the QR factor.
    other = random_stiefel(*shape, dtype=torch.float64, generator=generator)
    qr_factor = torch.linalg.qr(a)[0]
    distance = (q - a).norm(dim=(-2, -1))
    assert (distance <= (other - a).norm(dim=(-2, -1)) + 1e-12).all()
    assert (distance <= (qr_factor - a).norm(dim=(-2, -1)) + 1e-12).all()
    torch.testing.assert_close(orthonormalize(q), q, atol=1e-12, rtol=0)


def test_orthogonality_error_is_the_frobenius_defect() -> None:
    x = torch.zeros(2, 4, 2, dtype=torch.float64)
    x[0, 0, 0] = x[0, 1, 1] = 1.0  # orthonormal
    x[1, 0, 0] = 2.0  # x^T x - I = diag(3, -1): norm sqrt(10)
    torch.testing.assert_close(
        orthogonality_error(x), torch.tensor([0.0, 10**0.5], dtype=torch.float64)
    )
    assert orthogonality_error(x.to(torch.bfloat16)).dtype == torch.float32


FUNCTIONS_OF_X_AND_V = {
    "project_tangent": lambda x, v: project_tangent(x, v),
    "riemannian_gradient": lambda x, v: riemannian_gradient(x, v),
    "retract": lambda x, v: retract(x, v, "qr"),
    "transport": lambda x, v: transport(x, x, v),
    "transport_differentiated": lambda x, v: transport_differentiated(x, v, v, "cayley"),
    "inner": lambda x, v: inner(x, v, v),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS_OF_X_AND_V))
def test_bad_inputs_raise_value_errors_that_name_the_argument(name: str) -> None:
    function = FUNCTIONS_OF_X_AND_V[name]
    x = random_stiefel(6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`x`.*n >= p"):
        function(x.mT.contiguous(), x.mT.contiguous())
    with pytest.raises(ValueError, match="matrix shape"):
        function(x, torch.zeros(6, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not broadcast"):
        function(x.expand(2, 6, 2), torch.zeros(3, 6, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same dtype"):
        function(x, torch.zeros(6, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="floating dtype"):
        function(torch.zeros(6, 2, dtype=torch.int64), torch.zeros(6, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        function(torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(FUNCTIONS_OF_X_AND_V))
def test_leading_dimensions_broadcast_as_in_torch(name: str) -> None:
    # (4, n, p) with (n, p), and (n, p) with (4, n, p): the result of the broadcast pair
    function = FUNCTIONS_OF_X_AND_V[name]
    generator = torch.Generator().manual_seed(8)
    points = random_stiefel(4, 6, 2, dtype=torch.float64, generator=generator)
    vector = project_tangent(points[0], torch.randn(6, 2, dtype=torch.float64, generator=generator))
    batched = function(points, vector)
    one_by_one = torch.stack([function(point, vector) for point in points])
    torch.testing.assert_close(batched, one_by_one, atol=1e-12, rtol=0)
    single = points[0]
    vectors = torch.stack([vector, 2 * vector, -vector, 0.5 * vector])
    torch.testing.assert_close(
        function(single, vectors),
        torch.stack([function(single, v) for v in vectors]),
        atol=1e-12,
        rtol=0,
    )


def test_unknown_names_and_options_raise_value_errors() -> None:
    x = random_stiefel(6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="`method` must name a registered retraction"):
        retract(x, x, "householder")
    with pytest.raises(ValueError, match="`method`"):
        transport_differentiated(x, x, x, retraction="householder")
    with pytest.raises(ValueError, match="`metric`"):
        riemannian_gradient(x, x, metric="hyperbolic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`iterations`"):
        retract_cayley_iterative(x, x, iterations=0)
    with pytest.raises(ValueError, match="`steps`"):
        retract_polar_newton_schulz(x, x, steps=0)
    with pytest.raises(ValueError, match="`shape`"):
        random_stiefel(2, 5)
    with pytest.raises(ValueError, match="`dtype`"):
        random_stiefel(5, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="already registered"):
        register_retraction("qr")(lambda x, v: x)


def test_a_registered_retraction_is_usable_everywhere_by_name() -> None:
    from stiefel_peft.geometry import RETRACTIONS, Stiefel

    @register_retraction("test_normalized_qr")
    def normalized_qr(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.linalg.qr(x + v)[0]

    try:
        x = random_stiefel(9, 3, dtype=torch.float64)
        v = project_tangent(x, 0.1 * torch.randn(9, 3, dtype=torch.float64))
        assert orthogonality_error(retract(x, v, "test_normalized_qr")) < 1e-12
        # Half inputs reach a registered function in float32 and come back in their dtype.
        assert retract(x.bfloat16(), v.bfloat16(), "test_normalized_qr").dtype == torch.bfloat16
        manifold = Stiefel(retraction="test_normalized_qr")
        assert orthogonality_error(manifold.retr(x, v)) < 1e-12
        moved = transport_differentiated(x, v, v, retraction="test_normalized_qr")
        assert moved.shape == x.shape
    finally:
        del RETRACTIONS["test_normalized_qr"]
