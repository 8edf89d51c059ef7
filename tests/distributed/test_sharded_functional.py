"""The sharded Adam step's algebra in one process (no collectives needed).

With the identity as ``all_reduce`` the sharded step is the unsharded one written with reduced
products; and with rows split into two shards whose p x p partial products are summed by a
two-thread barrier, it must give the unsharded step's rows. The multi-process gloo tests are in
``test_fsdp.py``.
"""

from __future__ import annotations

import threading

import pytest
import torch

from stiefel_peft.distributed import (
    sharded_orthogonality_error,
    sharded_orthonormalize,
    sharded_stiefel_adam_update,
)
from stiefel_peft.geometry import orthogonality_error, random_stiefel
from stiefel_peft.optim.functional import stiefel_adam_update
from tests.tolerances import CLOSE, orthonormal_tolerance

DTYPE = torch.float64


def _problem(frames: int, n: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.stack([random_stiefel(n, p, dtype=DTYPE, generator=generator) for _ in range(frames)])
    grad = torch.randn(frames, n, p, dtype=DTYPE, generator=generator)
    return x, grad


def _options(second_moment: str, step: int, correct_drift: bool) -> dict:
    return dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, step=step, second_moment=second_moment,
                correct_drift=correct_drift, maximize=False)  # fmt: skip


def _second_moment_buffer(x: torch.Tensor, second_moment: str) -> torch.Tensor:
    if second_moment == "matrix":
        return torch.zeros(x.shape[0], 1, 1, dtype=x.dtype)  # (b, 1, 1)
    return torch.zeros_like(x)


def _run_unsharded(x, grads, second_moment, drift_every):
    exp_avg = torch.zeros_like(x)
    exp_avg_sq = _second_moment_buffer(x, second_moment)
    for step, grad in enumerate(grads, start=1):
        options = _options(second_moment, step, step % drift_every == 0)
        x = stiefel_adam_update(
            x, grad, exp_avg, exp_avg_sq, retraction="cayley", retraction_options={}, **options
        )
    return x, exp_avg, exp_avg_sq


class _TwoThreadSum:
    """An in-place SUM between two threads: each adds its tensor, both read the total."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2)
        self.slots: list[torch.Tensor | None] = [None, None]
        self.sizes: list[int] = []

    def for_rank(self, rank: int):
        def all_reduce(tensor: torch.Tensor) -> None:
            self.slots[rank] = tensor.clone()
            if rank == 0:
                self.sizes.append(tensor.numel())
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()
            tensor.copy_(total)

        return all_reduce


@pytest.mark.parametrize("second_moment", ["matrix", "element"])
def test_identity_reduction_is_the_unsharded_step(second_moment: str) -> None:
    x, _ = _problem(3, 12, 4, seed=0)
    grads = [_problem(3, 12, 4, seed=s)[1] for s in range(1, 5)]
    expected, expected_m, expected_v = _run_unsharded(x, grads, second_moment, drift_every=2)
    exp_avg = torch.zeros_like(x)
    exp_avg_sq = _second_moment_buffer(x, second_moment)
    for step, grad in enumerate(grads, start=1):
        options = _options(second_moment, step, step % 2 == 0)
        x = sharded_stiefel_adam_update(
            x, grad, exp_avg, exp_avg_sq, all_reduce=lambda t: None, **options
        )
    tolerance = CLOSE[DTYPE]
    torch.testing.assert_close(x, expected, atol=tolerance, rtol=0)
    torch.testing.assert_close(exp_avg, expected_m, atol=tolerance, rtol=0)
    torch.testing.assert_close(exp_avg_sq, expected_v, atol=tolerance, rtol=0)


@pytest.mark.parametrize("second_moment", ["matrix", "element"])
@pytest.mark.parametrize("split", [7, 0])  # uneven shards, and one process holding no rows
def test_two_row_shards_give_the_unsharded_rows(second_moment: str, split: int) -> None:
    n, p, frames = 13, 3, 2
    x, _ = _problem(frames, n, p, seed=3)
    grads = [_problem(frames, n, p, seed=s)[1] for s in range(4, 8)]
    expected, _, _ = _run_unsharded(x, grads, second_moment, drift_every=3)
    reduction = _TwoThreadSum()
    results: list[torch.Tensor | None] = [None, None]
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            rows = slice(0, split) if rank == 0 else slice(split, n)
            local = x[:, rows].clone()
            exp_avg = torch.zeros_like(local)
            exp_avg_sq = _second_moment_buffer(local, second_moment)
            for step, grad in enumerate(grads, start=1):
                local = sharded_stiefel_adam_update(
                    local, grad[:, rows], exp_avg, exp_avg_sq, all_reduce=reduction.for_rank(rank),
                    **_options(second_moment, step, step % 3 == 0),
                )
            results[rank] = local
        except BaseException as error:  # surfaced below; a dead thread would hang the barrier
            errors.append(error)
            reduction.barrier.abort()

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    joined = torch.cat([results[0], results[1]], dim=1)  # (b, n, p)
    torch.testing.assert_close(joined, expected, atol=CLOSE[DTYPE], rtol=0)
    assert orthogonality_error(joined).max() < orthonormal_tolerance(DTYPE, p)
    # every reduced buffer is a few p x p blocks per frame, whatever n is
    assert max(reduction.sizes) <= frames * (2 * p) ** 2


def test_sharded_orthonormalize_and_error() -> None:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 10, 3, dtype=DTYPE, generator=generator)
    polar = sharded_orthonormalize(x, lambda t: None)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(polar, u @ vh, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        sharded_orthogonality_error(x, lambda t: None), orthogonality_error(x), atol=1e-10, rtol=0
    )
