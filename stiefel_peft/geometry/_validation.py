"""Argument checks and dtype handling shared by every geometry function.

Half-precision inputs (bf16, fp16) are computed in float32 and returned in the input dtype:
QR, SVD and solves have no (or no accurate) half-precision kernels, and orthonormality cannot
be held to better than the dtype's epsilon anyway.
"""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32 for half types, the dtype itself otherwise."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def check_frame(x: torch.Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is a floating (..., n, p) tensor with n >= p."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise ValueError(
            f"`{name}` must have a floating dtype (float16/bfloat16/float32/float64), got "
            f"{x.dtype}; convert it with `{name}.float()`"
        )
    if x.dim() < 2:
        raise ValueError(
            f"`{name}` must have shape (..., n, p) with at least 2 dimensions, got shape "
            f"{tuple(x.shape)}"
        )
    n, p = x.shape[-2], x.shape[-1]
    if p > n:
        raise ValueError(
            f"`{name}` has shape {tuple(x.shape)}: a Stiefel frame needs n >= p (tall), got "
            f"n={n} < p={p}; pass the transpose `{name}.mT` to work with orthonormal rows"
        )
    if p == 0:
        raise ValueError(f"`{name}` has shape {tuple(x.shape)}: p must be at least 1")


def check_like(x: torch.Tensor, v: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``v`` fits the frame ``x``: same dtype, same trailing
    ``(n, p)``, and leading (batch) dimensions that broadcast against ``x``'s as torch does
    (``(4, n, p)`` with ``(n, p)``, ``(3, 1, n, p)`` with ``(5, n, p)``)."""
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(v).__name__}")
    if v.dim() < 2 or v.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"`{name}` must have the matrix shape (n, p) = {tuple(x.shape[-2:])} of `x` "
            f"{tuple(x.shape)}, got {tuple(v.shape)}"
        )
    try:
        torch.broadcast_shapes(x.shape, v.shape)
    except RuntimeError:
        raise ValueError(
            f"`{name}` of shape {tuple(v.shape)} does not broadcast against `x` of shape "
            f"{tuple(x.shape)} (leading dimensions must be equal or 1)"
        ) from None
    if v.dtype != x.dtype:
        raise ValueError(
            f"`{name}` must have the same dtype as `x` ({x.dtype}), got {v.dtype}; convert "
            f"it with `{name}.to(x.dtype)`"
        )


def broadcast_frames(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors expanded to their common shape (views, no copy): torch.broadcast_tensors."""
    return tuple(torch.broadcast_tensors(*tensors))


def identity_like(x: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` x ``size`` identity with ``x``'s dtype and device (broadcasts over batch)."""
    return torch.eye(size, dtype=x.dtype, device=x.device)
