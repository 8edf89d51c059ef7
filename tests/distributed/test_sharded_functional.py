"""The sharded form of the one Adam step, in one process (no collectives needed).

``stiefel_adam_update`` takes a ``reduce``: with the identity (a sum over one process) it must be
the whole-frame step; with rows split into two shards whose p x p partial products are summed by
a two-thread barrier, it must give the whole-frame step's rows. The multi-process gloo tests are
in ``test_fsdp.py``.
"""

from __future__ import annotations

import threading

import pytest
import torch

from stiefel_peft.geometry import orthogonality_error, random_stiefel
from stiefel_peft.optim.functional import (
    orthogonality_errors,
    orthonormalized,
    stiefel_adam_update,
)
from tests.tolerances import CLOSE, orthonormal_tolerance

DTYPE = torch.float64


def _problem(frames: int, n: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.stack([random_stiefel(n, p, dtype=DTYPE, generator=generator) for _ in range(frames)])
    grad = torch.randn(frames, n, p, dtype=DTYPE, generator=generator)
    return x, grad


def _options(second_moment: str, step: int) -> dict:
    return dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, step=step, second_moment=second_moment,
                maximize=False, limit=1e-6, retraction="cayley", retraction_options={})  # fmt: skip


def _second_moment_buffer(x: torch.Tensor, second_moment: str) -> torch.Tensor:
    if second_moment == "matrix":
        return torch.zeros(x.shape[0], 1, 1, dtype=x.dtype)  # (b, 1, 1)
    return torch.zeros_like(x)


def _fresh_state(x: torch.Tensor, second_moment: str) -> list[torch.Tensor]:
    p = x.shape[-1]
    transport = torch.zeros(x.shape[0], p, p, dtype=x.dtype)
    return [torch.zeros_like(x), _second_moment_buffer(x, second_moment), transport]


def _run(x, grads, second_moment, reduce=None):
    state = _fresh_state(x, second_moment)
    for step, grad in enumerate(grads, start=1):
        options = _options(second_moment, step)
        x = stiefel_adam_update(x, grad.clone(), *state, reduce=reduce, **options).point
    return x, state


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
def test_identity_reduction_is_the_whole_frame_step(second_moment: str) -> None:
    x, _ = _problem(3, 12, 4, seed=0)
    grads = [_problem(3, 12, 4, seed=s)[1] for s in range(1, 5)]
    expected, expected_state = _run(x, grads, second_moment)
    reduced, state = _run(x, grads, second_moment, reduce=lambda t: None)
    tolerance = CLOSE[DTYPE]
    torch.testing.assert_close(reduced, expected, atol=tolerance, rtol=0)
    for value, reference in zip(state, expected_state, strict=True):
        torch.testing.assert_close(value, reference, atol=tolerance, rtol=0)


@pytest.mark.parametrize("second_moment", ["matrix", "element"])
@pytest.mark.parametrize("split", [7, 0])  # uneven shards, and one process holding no rows
def test_two_row_shards_give_the_unsharded_rows(second_moment: str, split: int) -> None:
    n, p, frames = 13, 3, 2
    x, _ = _problem(frames, n, p, seed=3)
    grads = [_problem(frames, n, p, seed=s)[1] for s in range(4, 8)]
    expected, _ = _run(x, grads, second_moment)
    reduction = _TwoThreadSum()
    results: list[torch.Tensor | None] = [None, None]
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            rows = slice(0, split) if rank == 0 else slice(split, n)
            local = x[:, rows].clone()
            state = _fresh_state(local, second_moment)
            if second_moment == "matrix":
                state[1] = torch.zeros(frames, 1, 1, dtype=DTYPE)  # replicated per matrix
            for step, grad in enumerate(grads, start=1):
                local = stiefel_adam_update(
                    local,
                    grad[:, rows].clone(),
                    *state,
                    reduce=reduction.for_rank(rank),
                    **_options(second_moment, step),
                ).point
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
    polar = orthonormalized(x, lambda t: None)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(polar, u @ vh, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        orthogonality_errors(x, lambda t: None), orthogonality_error(x), atol=1e-10, rtol=0
    )


def test_a_non_finite_gradient_in_one_shard_skips_the_frame_on_every_shard() -> None:
    # the guard reduces ||g||^2 over the shards: a NaN held by one process stops the frame on
    # both, so the replicated state and the rows stay consistent (ShardedStiefelAdam's policy)
    n, p, frames = 13, 3, 2
    x, grad = _problem(frames, n, p, seed=9)
    grad[1, 10, 0] = float("nan")  # frame 1, a row held by rank 1
    reduction = _TwoThreadSum()
    results: list[object] = [None, None]
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            rows = slice(0, 7) if rank == 0 else slice(7, n)
            local = x[:, rows].clone()
            state = _fresh_state(local, "matrix")
            state[1] = torch.zeros(frames, 1, 1, dtype=DTYPE)
            outcome = stiefel_adam_update(
                local, grad[:, rows].clone(), *state, reduce=reduction.for_rank(rank),
                **_options("matrix", 1),
            )  # fmt: skip
            results[rank] = (outcome, state)
        except BaseException as error:
            errors.append(error)
            reduction.barrier.abort()

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    for rank, rows in enumerate((slice(0, 7), slice(7, n))):
        outcome, state = results[rank]
        assert outcome.skipped.tolist() == [False, True]
        assert torch.equal(outcome.point[1], x[1, rows])  # left exactly as it was
        assert not torch.equal(outcome.point[0], x[0, rows])  # the other frame moved
        assert torch.equal(state[0][1], torch.zeros_like(state[0][1]))  # its moment too
        assert torch.isfinite(outcome.point).all()
