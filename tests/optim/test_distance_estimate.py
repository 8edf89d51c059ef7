"""StiefelAdam's `distance_estimate` groups (Prodigy) against a float64 reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stiefel_peft.geometry import random_stiefel
from stiefel_peft.optim import StiefelAdam

SHAPES = [(6, 3), (5,), (2, 3, 2)]


def _reference(
    points: list[torch.Tensor],
    gradients: list[list[torch.Tensor]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    initial_distance: float,
) -> tuple[list[torch.Tensor], list[float]]:
    """Prodigy (Adam form, with Adam's bias correction) on the concatenation, in float64."""
    beta1, beta2 = betas
    x = torch.cat([p.reshape(-1) for p in points]).double()
    x0 = x.clone()
    m, v, s = torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)
    r, d = 0.0, initial_distance
    distances = []
    for k, grads in enumerate(gradients, start=1):
        g = torch.cat([grad.reshape(-1) for grad in grads]).double()
        m = beta1 * m + (1 - beta1) * d * g
        v = beta2 * v + (1 - beta2) * d**2 * g**2
        r = math.sqrt(beta2) * r + (1 - math.sqrt(beta2)) * lr * d**2 * float(g @ (x0 - x))
        s = math.sqrt(beta2) * s + (1 - math.sqrt(beta2)) * lr * d**2 * g
        correction = math.sqrt(1 - beta2**k) / (1 - beta1**k)
        x = x * (1 - lr * d * weight_decay) - lr * d * correction * m / (v.sqrt() + d * eps)
        d = max(d, r / float(s.abs().sum()))
        distances.append(d)
    out, start = [], 0
    for p in points:
        out.append(x[start : start + p.numel()].reshape(p.shape))
        start += p.numel()
    return out, distances


def _gradients(steps: int, seed: int, drift: float = 0.5) -> list[list[torch.Tensor]]:
    """Noisy gradients with a consistent part, so that the estimate grows."""
    generator = torch.Generator().manual_seed(seed)
    bias = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
    return [
        [drift * b + torch.randn(b.shape, generator=generator, dtype=torch.float64) for b in bias]
        for _ in range(steps)
    ]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
def test_the_step_matches_a_float64_reference(weight_decay: float, maximize: bool) -> None:
    generator = torch.Generator().manual_seed(3)
    points = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
    gradients = _gradients(40, seed=4)
    options = {"lr": 0.7, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": weight_decay}
    params = [torch.nn.Parameter(p.clone()) for p in points]
    optimizer = StiefelAdam(
        params, stiefel=False, distance_estimate=True, initial_distance=1e-3, maximize=maximize,
        **options,
    )  # fmt: skip
    distances = []
    for grads in gradients:
        for param, grad in zip(params, grads, strict=True):
            param.grad = -grad if maximize else grad.clone()
        optimizer.step()
        distances.append(optimizer.param_groups[0]["distance"])
    expected, expected_distances = _reference(points, gradients, initial_distance=1e-3, **options)
    for param, want in zip(params, expected, strict=True):
        torch.testing.assert_close(param.detach(), want, rtol=1e-10, atol=1e-12)
    assert distances == pytest.approx(expected_distances, rel=1e-10)
    assert distances[-1] > 10 * 1e-3  # the consistent part of the gradient made it grow


def test_the_gradient_is_read_never_changed_and_the_estimate_never_decreases() -> None:
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    optimizer = StiefelAdam(params, stiefel=False, distance_estimate=True, lr=1.0)
    previous = 1e-6
    for grads in _gradients(30, seed=5, drift=0.1):
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.float()
        kept = [param.grad.clone() for param in params]
        optimizer.step()
        for param, grad in zip(params, kept, strict=True):
            assert torch.equal(param.grad, grad)
        assert optimizer.param_groups[0]["distance"] >= previous
        previous = optimizer.param_groups[0]["distance"]


def test_from_zero_it_finds_the_scale_of_a_quadratic() -> None:
    """min ||x - t||^2 from x = 0: no rate is given, the estimate sets one of t's size."""
    generator = torch.Generator().manual_seed(0)
    target = 0.05 * torch.randn(64, 32, generator=generator)
    x = torch.nn.Parameter(torch.zeros(64, 32))
    optimizer = StiefelAdam([x], stiefel=False, distance_estimate=True, lr=1.0)
    start = float(target.pow(2).sum())
    for _ in range(200):
        optimizer.zero_grad()
        (x - target).pow(2).sum().backward()
        optimizer.step()
    distance = optimizer.param_groups[0]["distance"]
    assert float((x.detach() - target).pow(2).sum()) < 1e-3 * start
    # of the order of the entries of t (mean |t| = 0.04), not the 1e-6 it started from
    assert 1e-3 < distance < float(target.abs().max())


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(min_value=1e-3, max_value=1e3))
def test_a_problem_scaled_by_s_gives_iterates_scaled_by_s(scale: float) -> None:
    """What a fixed rate lacks: with x0 = 0, d0 and the target scaled by s (eps = 0), every
    iterate and the estimate are scaled by s."""
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(8, 4, generator=generator, dtype=torch.float64)
    runs = []
    for factor in (1.0, scale):
        x = torch.nn.Parameter(torch.zeros(8, 4, dtype=torch.float64))
        optimizer = StiefelAdam(
            [x], stiefel=False, distance_estimate=True, lr=1.0, eps=0.0,
            initial_distance=1e-3 * factor,
        )  # fmt: skip
        for _ in range(30):
            x.grad = 2 * (x.detach() - factor * target)
            optimizer.step()
        runs.append((x.detach().clone(), optimizer.param_groups[0]["distance"]))
    (x_one, d_one), (x_scaled, d_scaled) = runs
    torch.testing.assert_close(x_scaled, scale * x_one, rtol=1e-9, atol=0)
    assert d_scaled == pytest.approx(scale * d_one, rel=1e-9)


def test_state_dict_round_trip_continues_identically() -> None:
    def build() -> tuple[list[torch.nn.Parameter], StiefelAdam]:
        params = [torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64)) for shape in SHAPES]
        return params, StiefelAdam(params, stiefel=False, distance_estimate=True, lr=1.0)

    gradients = _gradients(20, seed=6)
    params, optimizer = build()
    for grads in gradients[:10]:
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        optimizer.step()
    twins, restored = build()
    with torch.no_grad():
        for twin, param in zip(twins, params, strict=True):
            twin.copy_(param)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as if read from disk
    assert restored.param_groups[0]["distance"] == optimizer.param_groups[0]["distance"]
    for grads in gradients[10:]:
        for group in (params, twins):
            for param, grad in zip(group, grads, strict=True):
                param.grad = grad.clone()
        optimizer.step()
        restored.step()
    for param, twin in zip(params, twins, strict=True):
        assert torch.equal(param, twin)


def test_bad_options_are_refused_with_their_name() -> None:
    frame = torch.nn.Parameter(random_stiefel(6, 2, generator=torch.Generator().manual_seed(0)))
    free = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="for Euclidean groups"):
        StiefelAdam([frame], distance_estimate=True)
    with pytest.raises(ValueError, match="`distance_estimate` must be a bool"):
        StiefelAdam([free], stiefel=False, distance_estimate=1)
    for bad in (0.0, -1e-6, float("nan")):
        with pytest.raises(ValueError, match="initial_distance"):
            StiefelAdam([free], stiefel=False, distance_estimate=True, initial_distance=bad)
    with pytest.raises(ValueError, match="unknown option"):  # the estimate is state, not an option
        StiefelAdam([{"params": [free], "stiefel": False, "distance": 1e-3}])


def test_parameters_that_join_later_are_refused_not_mixed() -> None:
    first, second = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    optimizer = StiefelAdam([first, second], stiefel=False, distance_estimate=True)
    first.grad = torch.ones(3)
    optimizer.step()
    second.grad = torch.ones(2)
    before = (first.detach().clone(), second.detach().clone())
    with pytest.raises(ValueError, match="same number of steps"):
        optimizer.step()
    assert torch.equal(first, before[0]) and torch.equal(second, before[1])
