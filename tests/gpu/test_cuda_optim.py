"""StiefelAdam/StiefelSGD on CUDA: no host sync in the steady-state step, and CPU == CUDA in fp64.

Skipped without a CUDA device. The sync check runs the first step freely (it checks
orthonormality once, with one sync), then a few steps under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising CUDA call
(``.item()``, a device-to-host copy, ``torch.linalg`` error checks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from stiefel_peft.geometry import RETRACTIONS, orthogonality_error, random_stiefel
from stiefel_peft.optim import StiefelAdam, StiefelSGD
from tests.tolerances import CLOSE, orthonormal_tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = "cuda"
# The retractions whose step is matmul/LU only; the fused exact Cayley is the default.
# qr/polar/exp call QR, SVD, matrix_exp on CUDA, which torch may synchronise for (see
# docs/performance.md); benchmarks/gpu_suite.py records what they do on the device.
SYNC_FREE = ("cayley", "cayley_iterative", "polar_newton_schulz")


@contextmanager
def no_host_sync() -> Iterator[None]:
    """Raise on any synchronising CUDA call inside the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def frames(dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    """Tall (two of one shape: a shared bucket), wide and stacked frames."""
    generator = torch.Generator().manual_seed(seed)
    tall = [random_stiefel(96, 8, dtype=torch.float64, generator=generator) for _ in range(2)]
    other = random_stiefel(40, 8, dtype=torch.float64, generator=generator)
    wide = random_stiefel(64, 8, dtype=torch.float64, generator=generator).mT  # (8, 64)
    stack = random_stiefel(3, 24, 4, dtype=torch.float64, generator=generator)
    return [torch.nn.Parameter(t.to(dtype).to(device)) for t in (*tall, other, wide, stack)]


def gradient_sets(params: list[torch.Tensor], count: int, seed: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        [
            (1e-2 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
            .to(p.dtype)
            .to(p.device)
            for p in params
        ]
        for _ in range(count)
    ]


def steady_steps_without_sync(
    make: Callable[[list], torch.optim.Optimizer], dtype: torch.dtype, device: str = DEVICE
) -> list[torch.nn.Parameter]:
    params = frames(dtype, device)
    bias = torch.nn.Parameter(torch.zeros(8, dtype=dtype, device=device))
    optimizer = make([{"params": params}, {"params": [bias], "stiefel": False}])
    grads = gradient_sets([*params, bias], 4, seed=1)
    for index, step_grads in enumerate(grads):
        for param, grad in zip([*params, bias], step_grads, strict=True):
            param.grad = grad
        if index == 0:
            optimizer.step()  # first step: orthonormality check, the one allowed sync
            continue
        with no_host_sync():
            optimizer.step()
    torch.cuda.synchronize()
    return params


@pytest.mark.parametrize("retraction", SYNC_FREE)
@pytest.mark.parametrize("second_moment", ["matrix", "element"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stiefel_adam_steady_step_has_no_host_sync(
    retraction: str, second_moment: str, dtype: torch.dtype
) -> None:
    params = steady_steps_without_sync(
        lambda groups: StiefelAdam(
            groups,
            lr=1e-2,
            retraction=retraction,
            second_moment=second_moment,
            check_every=2,
        ),
        dtype,
    )
    for param in params:  # the steps did happen, and on the manifold
        frame = param if param.shape[-2] >= param.shape[-1] else param.mT
        assert orthogonality_error(frame).max() <= orthonormal_tolerance(dtype, frame.shape[-1])


@pytest.mark.parametrize("retraction", SYNC_FREE)
def test_stiefel_sgd_steady_step_has_no_host_sync(retraction: str) -> None:
    steady_steps_without_sync(
        lambda groups: StiefelSGD(
            groups,
            lr=1e-2,
            momentum=0.9,
            nesterov=True,
            retraction=retraction,
            check_every=2,
        ),
        torch.float32,
    )


def run_steps(retraction: str, second_moment: str, device: str, steps: int = 5) -> tuple:
    params = frames(torch.float64, device)
    optimizer = StiefelAdam(
        params,
        lr=5e-2,
        retraction=retraction,
        second_moment=second_moment,
        check_every=2,
    )
    for step_grads in gradient_sets(params, steps, seed=2):
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad
        optimizer.step()
    moments = [optimizer.state[p]["exp_avg"].detach().cpu() for p in params]
    return [p.detach().cpu() for p in params], moments


@pytest.mark.parametrize("retraction", sorted(RETRACTIONS))
@pytest.mark.parametrize("second_moment", ["matrix", "element"])
def test_cpu_and_cuda_steps_agree_in_float64(retraction: str, second_moment: str) -> None:
    cpu_params, cpu_moments = run_steps(retraction, second_moment, "cpu")
    cuda_params, cuda_moments = run_steps(retraction, second_moment, DEVICE)
    start = frames(torch.float64, "cpu")
    for before, cpu, cuda in zip(start, cpu_params, cuda_params, strict=True):
        assert (cpu - before.detach()).abs().max() > 1e-4  # the steps moved the point
        torch.testing.assert_close(cuda, cpu, atol=CLOSE[torch.float64], rtol=0)
    for cpu, cuda in zip(cpu_moments, cuda_moments, strict=True):
        torch.testing.assert_close(cuda, cpu, atol=CLOSE[torch.float64], rtol=0)
