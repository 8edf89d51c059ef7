"""Pure-torch primitives of the Stiefel manifold ``St(n, p) = {x : x^T x = I_p}``.

Every function works on ``(..., n, p)`` tensors (leading dims are a batch), costs O(n p^2) per
matrix and never forms an n x n matrix. Half-precision inputs are computed in float32 and
returned in their dtype. This subpackage imports nothing else from :mod:`stiefel_peft`.
See ``docs/geometry.md``.
"""

from .frames import orthogonality_error, orthonormalize, random_stiefel
from .kernels import cayley_coefficients, cayley_coefficients_orthonormal, newton_schulz_factor
from .manifold import Stiefel
from .projections import METRICS, inner, project_tangent, riemannian_gradient, skew, sym
from .retractions import (
    RETRACTIONS,
    approximation_tolerance,
    register_retraction,
    retract,
    retract_cayley,
    retract_cayley_iterative,
    retract_exp,
    retract_polar,
    retract_polar_newton_schulz,
    retract_qr,
)
from .transports import transport, transport_differentiated

__all__ = [
    "METRICS",
    "RETRACTIONS",
    "Stiefel",
    "approximation_tolerance",
    "cayley_coefficients",
    "cayley_coefficients_orthonormal",
    "inner",
    "newton_schulz_factor",
    "orthogonality_error",
    "orthonormalize",
    "project_tangent",
    "random_stiefel",
    "register_retraction",
    "retract",
    "retract_cayley",
    "retract_cayley_iterative",
    "retract_exp",
    "retract_polar",
    "retract_polar_newton_schulz",
    "retract_qr",
    "riemannian_gradient",
    "skew",
    "sym",
    "transport",
    "transport_differentiated",
]
