"""Orthogonality drift over 10,000 float32 steps; hypothesis properties of the bucketed step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stiefel_peft.geometry import RETRACTIONS, orthogonality_error, random_stiefel, retract_cayley
from stiefel_peft.optim import StiefelAdam, StiefelSGD
from stiefel_peft.optim.functional import cayley_coefficients
from tests.geometry.strategies import frame_shapes
from tests.tolerances import CLOSE, orthonormal_tolerance


@pytest.mark.slow
def test_drift_stays_below_1e5_over_10k_float32_steps() -> None:
    generator = torch.Generator().manual_seed(0)
    frame = torch.nn.Parameter(random_stiefel(576, 32, generator=generator))
    optimizer = StiefelAdam([frame], lr=1e-2)  # default: Cayley, correction every 100 steps
    noise = torch.randn(64, 576, 32, generator=generator)  # a pool of noisy gradients
    signal = torch.randn(576, 32, generator=generator)
    worst = 0.0
    for step in range(10_000):
        frame.grad = signal + noise[step % 64]
        optimizer.step()
        if step % 500 == 499 or step % 100 == 99:  # just before and after corrections
            worst = max(worst, orthogonality_error(frame.detach()).item())
    assert worst <= 1e-5


def test_fused_cayley_equals_the_registered_map() -> None:
    generator = torch.Generator().manual_seed(1)
    x = random_stiefel(5, 30, 4, dtype=torch.float64, generator=generator)
    x = x + 1e-4 * torch.randn(x.shape, dtype=torch.float64, generator=generator)  # off-manifold
    u = torch.randn(x.shape, dtype=torch.float64, generator=generator)  # not tangent
    c1, c2 = cayley_coefficients(x.mT @ x, x.mT @ u, u.mT @ u)
    torch.testing.assert_close(x @ c1 + u @ c2, retract_cayley(x, u), rtol=0, atol=1e-12)


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
    # the matmul-only retractions are approximate (error ~ step^3); with a Newton-Schulz
    # correction every step (drift_correction_every=1) they must stay within 1e-6
    approximate = retraction in ("cayley_iterative", "polar_newton_schulz")
    optimizer = StiefelAdam(
        params, lr=0.05, retraction=retraction, second_moment=second_moment,
        drift_correction_every=1 if approximate else 100,
    )
    for _ in range(5):
        for param in params:
            param.grad = torch.randn(param.shape, dtype=torch.float64, generator=generator)
        optimizer.step()
    for param in params:
        tall = param.detach().mT if transpose else param.detach()
        bound = 1e-6 if approximate else 100 * orthonormal_tolerance(torch.float64, tall.shape[-1])
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
