"""Creating, checking and repairing orthonormal frames."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._validation import check_frame, identity_like, working_dtype
from .retractions import qr_positive


def orthogonality_error(x: torch.Tensor) -> torch.Tensor:
    r"""``||x^T x - I_p||_F`` for each matrix of a ``(..., n, p)`` batch.

    Returns a ``(...)`` tensor in the working dtype (float32 for half inputs, so the error of
    a bf16 frame is measured, not rounded away). Cost: O(n p^2).
    Raises ``ValueError`` on a wide or non-floating input.
    """
    check_frame(x, "x")
    x = x.to(working_dtype(x.dtype))
    gram = x.mT @ x  # (..., p, p)
    return torch.linalg.matrix_norm(gram - identity_like(x, x.shape[-1]))


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    if len(shape) < 2 or not all(isinstance(size, int) and size >= 0 for size in shape):
        raise ValueError(
            f"`shape` must be (..., n, p) with at least two non-negative integers, got {shape}"
        )
    return tuple(shape)


def random_stiefel(
    *shape: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""A Haar-distributed random point of shape ``(..., n, p)``, n >= p.

    The sign-fixed QR factor of a standard Gaussian matrix, which is uniform on the manifold.
    Half dtypes are drawn and factorized in float32, then rounded.

    Args:
        *shape: ``(..., n, p)`` (or one tuple).
        dtype: floating dtype (default: torch's default dtype).
        device: as for :func:`torch.randn`.
        generator: as for :func:`torch.randn`.

    Raises:
        ValueError: if ``p > n``, ``p == 0`` or ``dtype`` is not floating.
    """
    size = _shape(shape)
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise ValueError(f"`dtype` must be a floating dtype, got {dtype}")
    if size[-1] > size[-2] or size[-1] == 0:
        raise ValueError(f"`shape` {size} is not a Stiefel shape: need n >= p >= 1 in (..., n, p)")
    gaussian = torch.randn(size, dtype=working_dtype(dtype), device=device, generator=generator)
    return qr_positive(gaussian)[0].to(dtype)


def orthonormalize(x: torch.Tensor) -> torch.Tensor:
    r"""The nearest orthonormal frame to ``x`` in the Frobenius norm (its polar factor).

    .. math:: \mathrm{orthonormalize}(x) = U V^\top, \qquad x = U \Sigma V^\top

    Use it to put a parameter on the manifold before handing it to a Stiefel optimizer.
    A rank-deficient ``x`` still gets an orthonormal result (not unique). Half inputs are
    computed in float32. Cost: O(n p^2) (thin SVD).

    Raises:
        ValueError: on a wide or non-floating input (transpose a wide matrix first).
    """
    check_frame(x, "x")
    working = x.to(working_dtype(x.dtype))
    left, _, right_h = torch.linalg.svd(working, full_matrices=False)
    return (left @ right_h).to(x.dtype)
