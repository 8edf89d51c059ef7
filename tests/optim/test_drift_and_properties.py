"""Orthogonality drift over 10,000 float32 steps; hypothesis properties of the bucketed step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stiefel_peft.geometry import (
    RETRACTIONS,
    orthogonality_error,
    random_stiefel,
    retract_cayley,
    sym,
)
from stiefel_peft.optim import StiefelAdam, StiefelSGD
from stiefel_peft.optim.functional import stiefel_sgd_update
from tests.geometry.strategies import frame_shapes
from tests.tolerances import CLOSE, orthonormal_tolerance


@pytest.mark.slow
def test_drift_stays_below_1e5_at_every_one_of_10k_float32_steps() -> None:
    # measured after every step, not only around corrections (the fused Cayley step folds a
    # Newton-Schulz correction into every step)
    generator = torch.Generator().manual_seed(0)
    frame = torch.nn.Parameter(random_stiefel(576, 32, generator=generator))
    optimizer = StiefelAdam([frame], lr=1e-2)
    noise = torch.randn(64, 576, 32, generator=generator)  # a pool of noisy gradients
    signal = torch.randn(576, 32, generator=generator)
    errors = torch.empty(10_000)
    for step in range(10_000):
        frame.grad = signal + noise[step % 64]
        optimizer.step()
        errors[step] = orthogonality_error(frame.detach())
    assert errors.max() <= 1e-5, errors.max()


@pytest.mark.parametrize("retraction", sorted(RETRACTIONS))
def test_every_retraction_keeps_the_drift_bound_at_every_step(retraction: str) -> None:
    generator = torch.Generator().manual_seed(1)
    frame = torch.nn.Parameter(random_stiefel(576, 32, generator=generator))
    optimizer = StiefelAdam([frame], lr=1e-2, retraction=retraction)
    noise = torch.randn(16, 576, 32, generator=generator)
    worst = 0.0
    for step in range(300):
        frame.grad = noise[step % 16]
        optimizer.step()
        worst = max(worst, orthogonality_error(frame.detach()).item())
    assert worst <= 1e-5, worst


def test_fused_step_is_the_cayley_map_from_the_newton_schulz_corrected_point() -> None:
    # one SGD step without momentum: y = R_cayley(x F, -lr r) with F = (3I - x^T x) / 2, up to
    # O(E^2) (the fused map takes x F as exactly orthonormal)
    generator = torch.Generator().manual_seed(1)
    x = random_stiefel(5, 30, 4, dtype=torch.float64, generator=generator)
    x = x + 1e-6 * torch.randn(x.shape, dtype=torch.float64, generator=generator)  # drifted
    grad = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    outcome = stiefel_sgd_update(
        x, grad.clone(), None, lr=0.1, momentum=0.0, dampening=0.0, nesterov=False,
        first_step=True, retraction="cayley", retraction_options={}, maximize=False, limit=1.0,
    )  # fmt: skip
    rgrad = grad - x @ sym(x.mT @ grad)
    fold = 1.5 * torch.eye(4, dtype=x.dtype) - 0.5 * (x.mT @ x)
    expected = retract_cayley(x @ fold, -0.1 * rgrad)
    torch.testing.assert_close(outcome.point, expected, rtol=0, atol=1e-9)
    # the drift is squared (3/4 E^2 to leading order), not carried
    before = orthogonality_error(x)
    assert (before > 1e-6).all()
    assert (orthogonality_error(outcome.point) <= before.square()).all()


@settings(max_examples=15, deadline=None)
@given(
    shapes=st.lists(frame_shapes(max_batch_dims=1), min_size=1, max_size=4),
    retraction=st.sampled_from(sorted(RETRACTIONS)),
    second_moment=st.sampled_from(["matrix", "element"]),
    transpose=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shapes_stay_orthonormal(shapes, retraction, second_moment, transpose, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    frames = [random_stiefel(*s, dtype=torch.float64, generator=generator) for s in shapes]
    params = [torch.nn.Parameter(f.mT.clone() if transpose else f) for f in frames]
    optimizer = StiefelAdam(
        params, lr=0.05, retraction=retraction, second_moment=second_moment, check_every=2
    )
    for _ in range(5):
        for param in params:
            param.grad = torch.randn(param.shape, dtype=torch.float64, generator=generator)
        optimizer.step()
    for param in params:
        tall = param.detach().mT if transpose else param.detach()
        bound = 100 * orthonormal_tolerance(torch.float64, tall.shape[-1])
        assert orthogonality_error(tall).max().item() < bound


@settings(max_examples=10, deadline=None)
@given(
    count=st.integers(2, 4),
    n=st.integers(3, 20),
    p=st.integers(1, 3),
    optimizer_name=st.sampled_from(["adam", "sgd"]),
    seed=st.integers(0, 2**16),
)
def test_batched_step_equals_one_by_one(count, n, p, optimizer_name, seed) -> None:
    generator = torch.Generator().manual_seed(seed)
    make = {
        "adam": lambda ps: StiefelAdam(ps, lr=0.05, retraction="qr"),
        "sgd": lambda ps: StiefelSGD(ps, lr=0.05, momentum=0.9),
    }[optimizer_name]
    frames = [random_stiefel(n, p, dtype=torch.float64, generator=generator) for _ in range(count)]
    batched = [torch.nn.Parameter(f.clone()) for f in frames]
    single = [torch.nn.Parameter(f.clone()) for f in frames]
    together = make(batched)
    alone = [make([param]) for param in single]
    for _ in range(4):
        grads = [torch.randn(n, p, dtype=torch.float64, generator=generator) for _ in frames]
        for a, b, g in zip(batched, single, grads, strict=True):
            a.grad, b.grad = g, g.clone()
        together.step()
        for optimizer in alone:
            optimizer.step()
    for a, b in zip(batched, single, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=CLOSE[torch.float64])
