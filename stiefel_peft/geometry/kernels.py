r"""Unvalidated p x p kernels shared by the retractions and the optimizers' fused steps.

Each takes the small products of a frame ``x`` and a step ``u`` (``G = x^T x``, ``B = x^T u``,
``S = u^T u``, all ``(..., p, p)``), never an ``n``-long tensor, so a caller that already holds
them (the optimizer forms them once per step, a sharded optimizer all-reduces them) pays only
O(p^3) here. No argument checks and no host synchronisation: the validated entry points are
:func:`stiefel_peft.geometry.retract_cayley` and friends.
"""

from __future__ import annotations

import torch

from .projections import sym

__all__ = ["cayley_coefficients", "cayley_coefficients_orthonormal", "newton_schulz_factor"]


def cayley_coefficients(
    gram: torch.Tensor, x_t_u: torch.Tensor, u_t_u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(..., p, p)`` coefficients with ``R^{cayley}_x(u) = x C_1 + u C_2``, from p x p products.

    The Cayley retraction in its Woodbury form (``x + U (I - V^T U / 2)^{-1} V^T x`` with
    ``U = [P u, x]``, ``V = [x, -P u]``, ``P u = u - x B / 2``) only needs ``G = x^T x``,
    ``B = x^T u`` and ``S = u^T u``:

    .. math::
        M = \begin{pmatrix} I - \tfrac12 (B - \tfrac12 G B) & -\tfrac12 G \\
        \tfrac12 (S - B^\top B + \tfrac14 B^\top G B) & I + \tfrac12 (B^\top - \tfrac12 B^\top G)
        \end{pmatrix},\quad
        \begin{pmatrix} K_1 \\ K_2 \end{pmatrix} = M^{-1}
        \begin{pmatrix} G \\ -(B^\top - \tfrac12 B^\top G) \end{pmatrix}

    and ``C_1 = I + K_2 - B K_1 / 2``, ``C_2 = K_1``. The true ``G`` (not ``I``) is used, so
    ``y = Q x`` with ``Q`` exactly orthogonal for any ``x`` and ``u``: ``y^T y = x^T x`` and
    rounding drift is carried, never amplified. The 2p x 2p system is factorized with
    ``lu_factor_ex(check_errors=False)`` (no host sync). Cost: O(p^3) per frame; nothing of
    size n.
    """
    p = gram.shape[-1]
    identity = torch.eye(p, dtype=gram.dtype, device=gram.device).expand_as(gram)
    b_t = x_t_u.mT
    x_t_pu = x_t_u - 0.5 * (gram @ x_t_u)  # x^T P u: (..., p, p)
    pu_t_x = x_t_pu.mT  # (P u)^T x
    pu_t_pu = u_t_u - b_t @ x_t_u + 0.25 * (b_t @ (gram @ x_t_u))
    top = torch.cat([identity - 0.5 * x_t_pu, -0.5 * gram], dim=-1)  # (..., p, 2p)
    bottom = torch.cat([0.5 * pu_t_pu, identity + 0.5 * pu_t_x], dim=-1)  # (..., p, 2p)
    system = torch.cat([top, bottom], dim=-2)  # I - V^T U / 2: (..., 2p, 2p)
    rhs = torch.cat([gram, -pu_t_x], dim=-2)  # V^T x: (..., 2p, p)
    factors, pivots, _ = torch.linalg.lu_factor_ex(system, check_errors=False)
    solution = torch.linalg.lu_solve(factors, pivots, rhs)  # (..., 2p, p)
    k1, k2 = solution[..., :p, :], solution[..., p:, :]
    return identity + k2 - 0.5 * (x_t_u @ k1), k1


def cayley_coefficients_orthonormal(
    x_t_u: torch.Tensor, u_t_u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`cayley_coefficients` for an orthonormal ``x`` (``G = I``): one p x p solve.

    With ``G = I`` the 2p x 2p system eliminates in closed form (its upper-right block is
    ``-I/2``), leaving

    .. math::
        N = 2I + \tfrac12 (B^\top - B) + \tfrac12 (S - B^\top B),\quad K = 2 N^{-1},\quad
        C_1 = (2I - B) K - I,\quad C_2 = K

    so that ``R^{cayley}_x(u) = x C_1 + u C_2`` (``B = x^T u``, ``S = u^T u``). ``N`` is
    invertible whenever the Cayley map is defined; ``u = 0`` gives ``(I, I)`` and ``y = x``.
    An ``x`` with ``x^T x = I + E`` gets a map orthogonal to ``O(E)``: callers first fold a
    Newton-Schulz step into ``x`` (``x F`` with :func:`newton_schulz_factor`, so ``E`` becomes
    ``O(E^2)``). Cost: O(p^3) per frame (one p x p inverse, no host sync).
    """
    p = x_t_u.shape[-1]
    identity = torch.eye(p, dtype=x_t_u.dtype, device=x_t_u.device)
    b_t = x_t_u.mT
    system = 2.0 * identity + 0.5 * (b_t - x_t_u + u_t_u - b_t @ x_t_u)  # N: (..., p, p)
    inverse, _ = torch.linalg.inv_ex(system)  # no error check: no host sync
    k = 2.0 * inverse
    return (2.0 * identity - x_t_u) @ k - identity, k


def newton_schulz_factor(gram: torch.Tensor) -> torch.Tensor:
    r"""``F = (3 I - G) / 2`` of a ``(..., p, p)`` Gram ``G = y^T y``: one Newton-Schulz step.

    ``y F`` is closer to orthonormal than ``y``: if ``G = I + E`` (``E`` symmetric) then
    ``(y F)^T (y F) = F G F = I - \tfrac34 E^2 + O(E^3)``, the drift is squared. ``F`` is
    symmetric, so ``(y F)^T m = F (y^T m)``. Cost: O(p^2).
    """
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return 1.5 * identity - 0.5 * sym(gram)
