"""Vector transports on the Stiefel manifold.

Two families: the projection transport ``transport(x, y, v)`` (move ``v`` to ``T_y`` by the
tangent projection, the transport geoopt's EuclideanStiefel uses) and the
differentiated-retraction transport ``transport_differentiated(x, u, v, retraction)``, which
is ``d/dt R_x(u + t v)|_{t=0}``, the transport that the retraction itself induces. Closed
forms exist for ``qr``, ``cayley`` and ``polar``; every other registered retraction is
differentiated by forward-mode automatic differentiation (``torch.func.jvp``). All O(n p^2).
"""

from __future__ import annotations

import torch

from ._validation import broadcast_frames, check_frame, check_like, identity_like, working_dtype
from .projections import _project_tangent
from .retractions import cayley_factors, check_retraction, qr_positive


def transport(x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""Projection transport of ``v`` (tangent at ``x``) to the tangent space at ``y``.

    .. math:: \mathcal{T}_{x \to y}(v) = v - y\,\mathrm{sym}(y^\top v)

    Args: ``x``, ``y``, ``v``: ``(..., n, p)``, one dtype (``x`` is checked, not used).
    Returns ``(..., n, p)`` in ``T_y``. Cost: O(n p^2). Raises ``ValueError`` on bad input.
    """
    check_frame(x, "x")
    check_like(x, y, "y")
    check_like(x, v, "v")
    dtype = working_dtype(x.dtype)
    return _project_tangent(y.to(dtype), v.to(dtype)).to(x.dtype)


def _differentiated_qr(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Absil, Mahony & Sepulchre (2008), Example 8.1.5: with y r = x + u (sign-fixed),
    # D qf(x+u)[v] = y rho_skew(y^T v r^{-1}) + (I - y y^T) v r^{-1}.
    y, r = qr_positive(x + u)
    v_rinv = torch.linalg.solve_triangular(r, v, upper=True, left=False)  # v r^{-1}: (..., n, p)
    omega = y.mT @ v_rinv  # (..., p, p)
    lower = torch.tril(omega, diagonal=-1)
    return y @ (lower - lower.mT) + v_rinv - y @ omega


def _differentiated_cayley(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # y(u) = x + U M^{-1} V^T x with U = [P u, x], V = [x, -P u], M = I - V^T U / 2.
    # U and V are linear in u, so dU = [P v, 0], dV = [0, -P v].
    left, right = cayley_factors(x, u)
    p = x.shape[-1]
    system = identity_like(x, 2 * p) - 0.5 * (right.mT @ left)  # (..., 2p, 2p)
    solution = torch.linalg.solve(system, right.mT @ x)  # K = M^{-1} V^T x: (..., 2p, p)
    projected = v - 0.5 * (x @ (x.mT @ v))  # P v: (..., n, p)
    zeros = torch.zeros_like(projected)
    d_left = torch.cat([projected, zeros], dim=-1)  # (..., n, 2p)
    d_right = torch.cat([zeros, -projected], dim=-1)  # (..., n, 2p)
    d_system = -0.5 * (d_right.mT @ left + right.mT @ d_left)  # (..., 2p, 2p)
    d_solution = torch.linalg.solve(system, d_right.mT @ x - d_system @ solution)
    return d_left @ solution + left @ d_solution


def _differentiated_polar(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # With a = x + u = q h (q the polar factor, h = (a^T a)^{1/2}):
    # dq = q s + (I - q q^T) v h^{-1}, where the skew s solves h s + s h = q^T v - v^T q.
    # Solved in the eigenbasis of h, where h s + s h is diagonal: s_ij = c_ij / (l_i + l_j).
    # (Autodiff through the SVD divides by sigma_i^2 - sigma_j^2, which is 0 at u = 0.)
    a = x + u
    eigenvalues, basis = torch.linalg.eigh(a.mT @ a)  # (..., p), (..., p, p)
    roots = eigenvalues.clamp_min(torch.finfo(a.dtype).tiny).sqrt()
    h_inverse = (basis / roots.unsqueeze(-2)) @ basis.mT  # (..., p, p)
    q = a @ h_inverse
    c = q.mT @ v
    c = basis.mT @ (c - c.mT) @ basis
    s = basis @ (c / (roots.unsqueeze(-1) + roots.unsqueeze(-2))) @ basis.mT
    v_h_inverse = v @ h_inverse  # (..., n, p)
    return q @ s + v_h_inverse - q @ (q.mT @ v_h_inverse)


_CLOSED_FORMS = {
    "qr": _differentiated_qr,
    "cayley": _differentiated_cayley,
    "polar": _differentiated_polar,
}


def transport_differentiated(
    x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, retraction: str = "cayley"
) -> torch.Tensor:
    r"""Differentiated-retraction transport of ``v`` along ``u``.

    .. math:: \mathcal{T}_u(v) = \frac{d}{dt} R_x(u + t v)\Big|_{t=0} \in T_{R_x(u)}

    Closed forms for ``qr`` (Absil et al. 2008: ``y rho_skew(y^T v r^{-1}) + (I - y y^T) v
    r^{-1}`` with ``y r = x + u``), ``cayley`` (the derivative of the 2p x 2p Woodbury
    form) and ``polar`` (``q s + (I - q q^T) v h^{-1}`` with ``x + u = q h`` and the skew
    ``s`` solving ``h s + s h = q^T v - v^T q``; autodiff through an SVD would divide by zero
    at ``u = 0``); forward-mode autodiff of the registered function for any other name.

    Args:
        x: ``(..., n, p)`` point. u: ``(..., n, p)`` tangent at ``x`` (the step).
        v: ``(..., n, p)`` tangent at ``x`` (the vector to move). Leading dimensions
            broadcast.
        retraction: a registered retraction name.

    Returns:
        ``(..., n, p)`` tangent at ``R_x(u)``. Cost: O(n p^2) (plus O(p^3)).

    Raises:
        ValueError: on an unknown retraction or bad input.
    """
    function = check_retraction(retraction)
    check_frame(x, "x")
    check_like(x, u, "u")
    check_like(x, v, "v")
    dtype = working_dtype(x.dtype)
    x_w, u_w, v_w = broadcast_frames(x.to(dtype), u.to(dtype), v.to(dtype))
    closed_form = _CLOSED_FORMS.get(retraction)
    if closed_form is not None:
        return closed_form(x_w, u_w, v_w).to(x.dtype)
    _, tangent = torch.func.jvp(lambda step: function(x_w, step), (u_w,), (v_w,))
    return tangent.to(x.dtype)
