"""RiemannianWrapper contract, and the example script in its fast mode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from stiefel_peft.geometry import orthogonality_error, random_stiefel
from stiefel_peft.optim import RiemannianWrapper

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stiefel_adam.py"


def test_wrapper_keeps_frames_orthonormal_and_restores_grads() -> None:
    generator = torch.Generator().manual_seed(0)
    tall = torch.nn.Parameter(random_stiefel(12, 3, generator=generator))
    wide = torch.nn.Parameter(random_stiefel(9, 2, generator=generator).T.contiguous())
    bias = torch.nn.Parameter(torch.zeros(4))
    inner = torch.optim.Adam(
        [{"params": [tall, wide]}, {"params": [bias], "stiefel": False}], lr=0.05
    )
    optimizer = RiemannianWrapper(inner, retraction="qr")
    for _ in range(10):
        grads = [torch.randn(p.shape, generator=generator) for p in (tall, wide, bias)]
        for param, grad in zip((tall, wide, bias), grads, strict=True):
            param.grad = grad
        bias_before = bias.detach().clone()
        optimizer.step()
        for param, grad in zip((tall, wide, bias), grads, strict=True):
            assert param.grad is grad  # swapped back, untouched
        assert not torch.equal(bias, bias_before)  # the Euclidean group is stepped as usual
    assert orthogonality_error(tall.detach()).item() < 1e-5
    assert orthogonality_error(wide.detach().T).item() < 1e-5
    # the inner optimizer's moments hold Riemannian (tangent) gradients, never transported
    assert set(optimizer.state[tall]) == {"step", "exp_avg", "exp_avg_sq"}


def test_example_runs_in_fast_mode(capsys) -> None:
    spec = importlib.util.spec_from_file_location("stiefel_adam_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--fast"])
    assert "||X^T X - I||" in capsys.readouterr().out
    assert result["orthogonality_error"] < 1e-10
    assert result["gap"] < 0.05
