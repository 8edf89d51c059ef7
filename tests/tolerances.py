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
