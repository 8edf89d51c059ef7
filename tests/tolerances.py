"""One table of numerical tolerances per dtype, shared by every test.

``orthonormal``: bound on ||x^T x - I||_F for a freshly computed frame of moderate size.
``close``: absolute tolerance for comparing two computations of the same quantity.
"""

from __future__ import annotations

import torch

ORTHONORMAL = {
    torch.float64: 1e-11,
    torch.float32: 1e-4,
    torch.bfloat16: 1e-1,
    torch.float16: 2e-2,
}

CLOSE = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 5e-2,
    torch.float16: 1e-2,
}


def orthonormal_tolerance(dtype: torch.dtype, p: int = 1) -> float:
    """Tolerance for ||x^T x - I||_F, growing with sqrt(p) (the Frobenius norm of p^2 errors)."""
    return ORTHONORMAL[dtype] * max(1.0, p**0.5)


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2``: the largest relative error of rounding a real number to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def rounding_error(dtype: torch.dtype, p: int) -> float:
    """Bound on what rounding an orthonormal (n, p) frame to ``dtype`` adds to ``||x^T x - I||_F``.

    With ``x~ = x + E``, ``|E_ij| <= u |x_ij|``: ``||E||_F <= u sqrt(p)`` and
    ``||x~^T x~ - I||_F <= 2 ||E||_F + ||E||_F^2``.
    """
    size = unit_roundoff(dtype) * p**0.5
    return 2 * size + size**2


def retraction_tolerance(dtype: torch.dtype, p: int) -> float:
    """What a retraction computed in the working dtype may add to ``||y^T y - I||_F``.

    float32/float64: the computation's own rounding (:data:`ORTHONORMAL`); half dtypes: the
    float32 computation plus rounding its result to the dtype, and nothing more (a "retraction"
    returning ``x + v`` unchanged fails it at ``||v||_F = 0.5``).
    """
    if dtype in (torch.float32, torch.float64):
        return orthonormal_tolerance(dtype, p)
    return rounding_error(dtype, p) + orthonormal_tolerance(torch.float32, p)
