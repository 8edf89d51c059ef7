"""State round trips, dtypes (bf16 master copies), wide and stacked parameters, grad handling."""

from __future__ import annotations

import copy
import io

import geoopt
import pytest
import torch

from stiefel_peft.geometry import Stiefel, orthogonality_error, random_stiefel
from stiefel_peft.optim import StiefelAdam, StiefelSGD
from tests.tolerances import orthonormal_tolerance

FACTORIES = {
    "adam-matrix": lambda ps: StiefelAdam(ps, lr=1e-2),
    "adam-element": lambda ps: StiefelAdam(ps, lr=1e-3, second_moment="element", retraction="qr"),
    "sgd-momentum": lambda ps: StiefelSGD(ps, lr=1e-2, momentum=0.9, retraction="polar"),
}


def _frames(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    tall = [random_stiefel(20, 4, generator=generator) for _ in range(3)]
    wide = random_stiefel(20, 4, generator=generator).T  # (4, 20): orthonormal rows
    stack = random_stiefel(2, 3, 9, 2, generator=generator)  # a (2, 3) batch of 9 x 2 frames
    return [torch.nn.Parameter(t.to(dtype)) for t in (*tall, wide, stack)]


def _grads(params, generator) -> list[torch.Tensor]:
    return [torch.randn(p.shape, generator=generator).to(p.dtype) for p in params]


def _run(optimizer, params, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param, grad in zip(params, _grads(params, generator), strict=True):
            param.grad = grad
        optimizer.step()


def _error(param: torch.Tensor) -> float:
    tall = param if param.shape[-2] >= param.shape[-1] else param.mT
    return orthogonality_error(tall).max().item()


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_tall_wide_and_stacked_stay_orthonormal(name: str) -> None:
    params = _frames()
    optimizer = FACTORIES[name](params)
    start = [p.detach().clone() for p in params]
    _run(optimizer, params, 30, seed=1)
    for param, before in zip(params, start, strict=True):
        assert not torch.equal(param, before)
        assert _error(param) < orthonormal_tolerance(torch.float32, 4)
    wide = params[3].detach()
    torch.testing.assert_close(wide @ wide.T, torch.eye(4), rtol=0, atol=1e-5)  # rows


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(name: str, dtype: torch.dtype) -> None:
    params = _frames(dtype)
    optimizer = FACTORIES[name](params)
    _run(optimizer, params, 5, seed=2)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = FACTORIES[name](twins)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    _run(optimizer, params, 7, seed=3)
    _run(restored, twins, 7, seed=3)
    for a, b in zip(params, twins, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(params, twins, strict=True):
        for key, value in optimizer.state[a].items():
            assert torch.equal(value, restored.state[b][key]), key


def test_bf16_parameters_use_a_float32_master_copy() -> None:
    params = _frames(torch.bfloat16)
    optimizer = StiefelAdam(params, lr=1e-2)
    _run(optimizer, params, 40, seed=4)
    for param in params:
        master = optimizer.state[param]["master"]
        assert master.dtype == torch.float32 and param.dtype == torch.bfloat16
        tall = param if param.shape[-2] >= param.shape[-1] else param.mT
        assert torch.equal(tall.detach(), master.to(torch.bfloat16))  # parameter = rounded master
        assert orthogonality_error(master).max().item() < 1e-5
        assert _error(param) < orthonormal_tolerance(torch.bfloat16, 4)
        assert optimizer.state[param]["exp_avg"].dtype == torch.float32


def test_grad_untouched_and_none_skipped() -> None:
    params = _frames()
    optimizer = StiefelAdam(params, lr=1e-2)
    generator = torch.Generator().manual_seed(5)
    grads = _grads(params, generator)
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.clone()
    params[1].grad = None
    frozen = params[1].detach().clone()
    optimizer.step()
    assert torch.equal(params[1], frozen)
    assert int(optimizer.state[params[1]]["step"]) == 0
    assert int(optimizer.state[params[0]]["step"]) == 1
    for i, param in enumerate(params):
        if i != 1:
            assert torch.equal(param.grad, grads[i])
    # the skipped parameter catches up later with its own step count
    params[1].grad = grads[1].clone()
    optimizer.step()
    assert int(optimizer.state[params[1]]["step"]) == 1
    assert int(optimizer.state[params[0]]["step"]) == 2


def test_geoopt_stiefel_manifold_parameter_is_constrained_in_any_group() -> None:
    generator = torch.Generator().manual_seed(6)
    frame = geoopt.ManifoldParameter(random_stiefel(10, 3, generator=generator), manifold=Stiefel())
    plain = torch.nn.Parameter(torch.randn(10, 3, generator=generator))
    optimizer = StiefelAdam([{"params": [frame, plain], "stiefel": False}], lr=0.1)
    for _ in range(10):
        frame.grad = torch.randn(10, 3, generator=generator)
        plain.grad = torch.randn(10, 3, generator=generator)
        optimizer.step()
    assert _error(frame) < 1e-5
    assert _error(plain) > 0.1  # stepped by AdamW


def test_deepcopy_and_rebuild_after_add_param_group() -> None:
    params = _frames()
    optimizer = StiefelAdam(params[:2], lr=1e-2)
    _run(optimizer, params[:2], 3, seed=7)
    optimizer.add_param_group({"params": params[2:]})
    _run(optimizer, params, 3, seed=8)
    assert int(optimizer.state[params[0]]["step"]) == 6
    assert int(optimizer.state[params[4]]["step"]) == 3
    clone = copy.deepcopy(optimizer.state_dict())
    assert clone["state"][0]["exp_avg"].shape == (20, 4)
