"""Tangent projection, Riemannian gradients and metrics on the Stiefel manifold.

Conventions: a point is ``x`` of shape ``(..., n, p)`` with ``n >= p`` and ``x^T x = I_p``;
leading dimensions are batch dimensions. The tangent space at ``x`` is
``T_x = {v : x^T v + v^T x = 0}``. Every function here costs O(n p^2) per matrix and never
forms an n x n matrix.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._validation import broadcast_frames, check_frame, check_like, working_dtype

Metric = Literal["euclidean", "canonical"]
METRICS: tuple[str, ...] = ("euclidean", "canonical")


def sym(a: torch.Tensor) -> torch.Tensor:
    """Symmetric part ``(a + a^T) / 2`` of a batch of square matrices ``(..., p, p)``."""
    return 0.5 * (a + a.mT)


def skew(a: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric part ``(a - a^T) / 2`` of a batch of square matrices ``(..., p, p)``."""
    return 0.5 * (a - a.mT)


def check_metric(metric: str) -> None:
    """Raise ``ValueError`` unless ``metric`` is one of :data:`METRICS`."""
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}")


def _project_tangent(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v - x @ sym(x.mT @ v)  # (..., n, p) @ (..., p, p)


def project_tangent(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""Orthogonal projection (Euclidean metric) of an ambient ``v`` onto ``T_x``.

    .. math:: P_x(v) = v - x \,\mathrm{sym}(x^\top v)

    Args:
        x: ``(..., n, p)`` point, ``x^T x = I_p``.
        v: ``(..., n, p)`` ambient vector, same dtype as ``x``.

    Returns:
        ``(..., n, p)`` tangent vector in ``x``'s dtype (half inputs are computed in float32).
        Cost: O(n p^2).

    Raises:
        ValueError: on a wide, non-floating or mismatched input.
    """
    check_frame(x, "x")
    check_like(x, v, "v")
    dtype = working_dtype(x.dtype)
    return _project_tangent(x.to(dtype), v.to(dtype)).to(x.dtype)


def _riemannian_gradient(x: torch.Tensor, egrad: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "euclidean":
        return _project_tangent(x, egrad)
    return egrad - x @ (egrad.mT @ x)  # (..., n, p) @ (..., p, p)


def riemannian_gradient(
    x: torch.Tensor, egrad: torch.Tensor, metric: Metric = "euclidean"
) -> torch.Tensor:
    r"""The Riemannian gradient of ``f`` at ``x`` from its Euclidean gradient ``egrad``.

    .. math::
        \mathrm{grad}_e f = g - x\,\mathrm{sym}(x^\top g) \quad\text{(Euclidean metric)},\qquad
        \mathrm{grad}_c f = g - x g^\top x \quad\text{(canonical metric)}

    Both satisfy ``<grad f, xi>_metric = Df(x)[xi]`` for every tangent ``xi``, where the
    canonical metric is ``<u, v>_c = tr(u^T (I - x x^T / 2) v)``.

    Args:
        x: ``(..., n, p)`` point.
        egrad: ``(..., n, p)`` Euclidean gradient, same dtype as ``x``.
        metric: ``"euclidean"`` or ``"canonical"``.

    Returns:
        ``(..., n, p)`` tangent vector in ``x``'s dtype. Cost: O(n p^2).

    Raises:
        ValueError: on an unknown metric or a wide, non-floating or mismatched input.
    """
    check_metric(metric)
    check_frame(x, "x")
    check_like(x, egrad, "egrad")
    dtype = working_dtype(x.dtype)
    return _riemannian_gradient(x.to(dtype), egrad.to(dtype), metric).to(x.dtype)


def inner(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, metric: Metric = "euclidean"
) -> torch.Tensor:
    r"""The metric ``<u, v>_x`` of two tangent vectors, one value per matrix.

    .. math::
        \langle u, v\rangle_e = \mathrm{tr}(u^\top v), \qquad
        \langle u, v\rangle_c = \mathrm{tr}(u^\top v)
            - \tfrac12 \mathrm{tr}((x^\top u)^\top x^\top v)

    Args:
        x: ``(..., n, p)`` point.
        u: ``(..., n, p)`` tangent vector, ``x``'s dtype; leading dimensions broadcast.
        v: ``(..., n, p)`` tangent vector, likewise.
        metric: ``"euclidean"`` or ``"canonical"``.

    Returns:
        ``(...)`` tensor (the broadcast batch shape) in the working dtype (float32 for half
        inputs). Cost: O(n p^2).
    """
    check_metric(metric)
    check_frame(x, "x")
    check_like(x, u, "u")
    check_like(x, v, "v")
    dtype = working_dtype(x.dtype)
    x, u, v = broadcast_frames(x.to(dtype), u.to(dtype), v.to(dtype))
    value = (u * v).sum((-2, -1))
    if metric == "canonical":
        value = value - 0.5 * ((x.mT @ u) * (x.mT @ v)).sum((-2, -1))
    return value
