"""Pure step functions on stacked buckets of Stiefel frames.

Every function takes ``(b, n, p)`` tensors (``b`` frames of the same shape, ``n >= p``) in one
working dtype (float32 or float64), costs O(b n p^2) (plus O(b p^3) for small solves) and never
forms an n x n matrix. Moment buffers are updated in place; the new point is returned. The
classes in :mod:`stiefel_peft.optim` hold the choices and the state and call these. The math is
written out in ``docs/optim.md``.

Nothing here synchronises with the host: no ``.item()``, no data-dependent Python branch, and
the 2p x 2p Cayley system is factorized with ``lu_factor_ex(check_errors=False)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from stiefel_peft.geometry import RETRACTIONS, retract_cayley

SECOND_MOMENTS: tuple[str, ...] = ("matrix", "element")


def symmetric_part(a: torch.Tensor) -> torch.Tensor:
    """``(a + a^T) / 2`` of ``(b, p, p)`` matrices."""
    return 0.5 * (a + a.mT)


def riemannian_gradient_bucket(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    r"""Euclidean-metric Riemannian gradient ``g - x sym(x^T g)`` of a bucket.

    Args: ``x``, ``grad``: ``(b, n, p)``, ``x^T x = I``. Returns ``(b, n, p)``. Cost: O(b n p^2).
    """
    gram = torch.bmm(x.mT, grad)  # x^T g: (b, p, p)
    return torch.baddbmm(grad, x, symmetric_part(gram), alpha=-1.0)


def project_bucket(
    y: torch.Tensor, v: torch.Tensor, y_t_v: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Projection ``v - y sym(y^T v)`` onto ``T_y``; ``y_t_v = y^T v`` may be passed if known.

    Used both as the tangent projection and as the projection vector transport to ``y``.
    Args: ``y``, ``v``: ``(b, n, p)``. Returns ``(b, n, p)``. Cost: O(b n p^2).
    """
    if y_t_v is None:
        y_t_v = torch.bmm(y.mT, v)  # (b, p, p)
    return torch.baddbmm(v, y, symmetric_part(y_t_v), alpha=-1.0)


def newton_schulz_correction(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One Newton-Schulz step towards the polar factor: ``x (3 I - x^T x) / 2``.

    If ``x^T x = I + E`` then the result has ``x^T x = I - (3/4) E^2 + O(E^3)``: the drift
    ``||E||`` is squared. Returns the corrected frame and the ``(b, p, p)`` factor
    ``(3 I - x^T x) / 2`` (so callers can update cached products). Cost: O(b n p^2).
    """
    gram = torch.bmm(x.mT, x)  # (b, p, p)
    factor = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device).mul(1.5) - 0.5 * gram
    return torch.bmm(x, factor), factor


def cayley_coefficients(
    gram: torch.Tensor, x_t_u: torch.Tensor, u_t_u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(b, p, p)`` coefficients with ``R^{cayley}_x(u) = x C_1 + u C_2``, from p x p products.

    The exact Woodbury form of :func:`stiefel_peft.geometry.retract_cayley`
    (``x + U (I - V^T U / 2)^{-1} V^T x``, ``U = [P u, x]``, ``V = [x, -P u]``,
    ``P u = u - x B / 2``) only needs ``G = x^T x``, ``B = x^T u`` and ``S = u^T u``:

    .. math::
        M = \begin{pmatrix} I - \tfrac12 (B - \tfrac12 G B) & -\tfrac12 G \\
        \tfrac12 (S - B^\top B + \tfrac14 B^\top G B) & I + \tfrac12 (B^\top - \tfrac12 B^\top G)
        \end{pmatrix},\quad
        \begin{pmatrix} K_1 \\ K_2 \end{pmatrix} = M^{-1}
        \begin{pmatrix} G \\ -(B^\top - \tfrac12 B^\top G) \end{pmatrix}

    and ``C_1 = I + K_2 - B K_1 / 2``, ``C_2 = K_1``. The true ``G`` (not ``I``) is used, so
    ``y = Q x`` with ``Q`` exactly orthogonal for any ``x`` and ``u``: ``y^T y = x^T x`` and
    rounding drift is carried, never amplified. Cost: O(b p^3); nothing of size n.
    """
    p = gram.shape[-1]
    identity = torch.eye(p, dtype=gram.dtype, device=gram.device).expand_as(gram)
    b_t = x_t_u.mT
    x_t_pu = x_t_u - 0.5 * torch.bmm(gram, x_t_u)  # x^T P u: (b, p, p)
    pu_t_x = x_t_pu.mT  # (P u)^T x
    pu_t_pu = u_t_u - torch.bmm(b_t, x_t_u) + 0.25 * torch.bmm(b_t, torch.bmm(gram, x_t_u))
    top = torch.cat([identity - 0.5 * x_t_pu, -0.5 * gram], dim=-1)  # (b, p, 2p)
    bottom = torch.cat([0.5 * pu_t_pu, identity + 0.5 * pu_t_x], dim=-1)  # (b, p, 2p)
    system = torch.cat([top, bottom], dim=-2)  # I - V^T U / 2: (b, 2p, 2p)
    rhs = torch.cat([gram, -pu_t_x], dim=-2)  # V^T x: (b, 2p, p)
    factors, pivots, _ = torch.linalg.lu_factor_ex(system, check_errors=False)
    solution = torch.linalg.lu_solve(factors, pivots, rhs)  # (b, 2p, p)
    k1, k2 = solution[:, :p], solution[:, p:]
    c1 = torch.baddbmm(identity + k2, x_t_u, k1, alpha=-0.5)
    return c1, k1


def uses_fused_cayley(retraction: str) -> bool:
    """True when ``retraction`` is the package's exact Cayley map (not a user replacement)."""
    return retraction == "cayley" and RETRACTIONS.get("cayley") is retract_cayley


def finish(
    y: torch.Tensor, momentum: torch.Tensor | None, y_t_m: torch.Tensor | None, correct_drift: bool
) -> torch.Tensor:
    r"""Drift correction (optional) and projection transport ``m <- m - y sym(y^T m)`` in place.

    ``y_t_m`` (``y^T m``, ``(b, p, p)``) is computed here when not given. Returns ``y``.
    """
    if correct_drift:
        y, factor = newton_schulz_correction(y)
        if y_t_m is not None:
            y_t_m = torch.bmm(factor, y_t_m)  # (y F)^T m = F (y^T m), F symmetric
    if momentum is not None:
        if y_t_m is None:
            y_t_m = torch.bmm(y.mT, momentum)  # (b, p, p)
        momentum.baddbmm_(y, symmetric_part(y_t_m), alpha=-1.0)
    return y


def retract_and_transport(
    x: torch.Tensor,
    step: torch.Tensor,
    momentum: torch.Tensor | None,
    *,
    retraction: str,
    retraction_options: Mapping[str, object],
    correct_drift: bool,
) -> torch.Tensor:
    r"""``y = R_x(step)``, optional drift correction, and ``momentum <- P_y(momentum)`` in place.

    The package's ``"cayley"`` is evaluated as ``x C_1 + step C_2`` (:func:`cayley_coefficients`);
    every other name calls ``RETRACTIONS[retraction]``. With ``correct_drift`` one
    :func:`newton_schulz_correction` follows the retraction.

    Args:
        x: ``(b, n, p)`` orthonormal frames. step: ``(b, n, p)`` tangent step at ``x``.
        momentum: ``(b, n, p)`` tangent at ``x`` (overwritten by its transport), or None.

    Returns ``(b, n, p)`` new frames. Cost: O(b n p^2) plus O(b p^3).
    """
    if uses_fused_cayley(retraction):
        c1, c2 = cayley_coefficients(
            torch.bmm(x.mT, x), torch.bmm(x.mT, step), torch.bmm(step.mT, step)
        )  # (b, p, p) each
        y = torch.bmm(x, c1).baddbmm_(step, c2)  # x C1 + u C2: (b, n, p)
    else:
        y = RETRACTIONS[retraction](x, step, **retraction_options)
    return finish(y, momentum, None, correct_drift)


def stiefel_adam_update(
    x: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    second_moment: str,
    retraction: str,
    retraction_options: Mapping[str, object],
    correct_drift: bool,
    maximize: bool,
) -> torch.Tensor:
    r"""One Riemannian Adam step on a bucket; moments are updated in place.

    .. math::
        r = P_x(\pm g),\quad m \leftarrow \beta_1 m + (1-\beta_1) r,\quad
        v \leftarrow \beta_2 v + (1-\beta_2)\,\|r\|_F^2 \ \text{(matrix)}\ \text{or}\
        r \odot r\ \text{(element)}

    .. math::
        d = \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon},\quad
        u = -\eta\, d\ \text{(matrix: tangent already)}\ \text{or}\ -\eta P_x(d)\
        \text{(element)},\quad y = R_x(u),\quad m \leftarrow P_y(m)

    Args:
        x, grad, exp_avg: ``(b, n, p)``; ``exp_avg`` tangent at ``x``.
        exp_avg_sq: ``(b, 1, 1)`` for ``second_moment="matrix"``, ``(b, n, p)`` for ``"element"``.
        step: the 1-based step count shared by the bucket (bias correction).

    Returns the ``(b, n, p)`` new point. Cost: O(b n p^2).
    """
    if maximize:
        grad = -grad
    gram = torch.bmm(x.mT, grad)  # x^T g: (b, p, p)
    rgrad = torch.baddbmm(grad, x, symmetric_part(gram), alpha=-1.0)  # P_x(g)
    exp_avg.lerp_(rgrad, 1.0 - beta1)
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
    fused = uses_fused_cayley(retraction)
    if second_moment == "matrix":
        squared_norm = torch.linalg.vector_norm(rgrad, dim=(-2, -1), keepdim=True).square_()
        exp_avg_sq.mul_(beta2).add_(squared_norm, alpha=1.0 - beta2)  # (b, 1, 1)
        scale = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps).reciprocal_()
        scale = scale.mul_(-step_size)  # u = scale * m, a tangent step: (b, 1, 1)
        if not fused:
            return retract_and_transport(
                x, exp_avg * scale, exp_avg, retraction=retraction,
                retraction_options=retraction_options, correct_drift=correct_drift,
            )
        # never form u: with A_m = x^T m and S_m = m^T m, x^T u = s A_m and u^T u = s^2 S_m
        x_t_m = torch.bmm(x.mT, exp_avg)  # (b, p, p)
        m_t_m = torch.bmm(exp_avg.mT, exp_avg)  # (b, p, p)
        c1, c2 = cayley_coefficients(torch.bmm(x.mT, x), x_t_m * scale, m_t_m * scale.square())
        c2 = c2.mul_(scale)  # y = x C1 + m (s C2)
        y = torch.bmm(x, c1).baddbmm_(exp_avg, c2)  # (b, n, p)
        y_t_m = torch.bmm(c1.mT, x_t_m).baddbmm_(c2.mT, m_t_m)  # y^T m without touching n
        return finish(y, exp_avg, y_t_m, correct_drift)
    exp_avg_sq.mul_(beta2).addcmul_(rgrad, rgrad, value=1.0 - beta2)  # (b, n, p)
    denominator = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    direction = torch.div(exp_avg, denominator).mul_(-step_size)
    # the element-wise preconditioned direction leaves T_x, so project it back
    x_t_direction = torch.bmm(x.mT, direction)  # (b, p, p)
    update = direction.baddbmm_(x, symmetric_part(x_t_direction), alpha=-1.0)  # P_x(d)
    if not fused:
        return retract_and_transport(
            x, update, exp_avg, retraction=retraction,
            retraction_options=retraction_options, correct_drift=correct_drift,
        )
    gram = torch.bmm(x.mT, x)  # (b, p, p)
    x_t_update = x_t_direction - torch.bmm(gram, symmetric_part(x_t_direction))  # x^T P_x(d)
    c1, c2 = cayley_coefficients(gram, x_t_update, torch.bmm(update.mT, update))
    y = torch.bmm(x, c1).baddbmm_(update, c2)  # (b, n, p)
    return finish(y, exp_avg, None, correct_drift)


def stiefel_sgd_update(
    x: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first_step: bool,
    retraction: str,
    retraction_options: Mapping[str, object],
    correct_drift: bool,
    maximize: bool,
) -> torch.Tensor:
    r"""One Riemannian SGD (heavy-ball / Nesterov) step on a bucket.

    .. math::
        r = P_x(\pm g),\quad b \leftarrow r\ \text{(first step)}\ \text{else}\
        \mu b + (1-\tau) r,\quad d = r + \mu b\ \text{(Nesterov)}\ \text{else}\ b,\quad
        y = R_x(-\eta d),\quad b \leftarrow P_y(b)

    ``momentum_buffer`` (``(b, n, p)``, or None when ``momentum == 0``) is updated in place.
    Returns the ``(b, n, p)`` new point. Cost: O(b n p^2).
    """
    if maximize:
        grad = -grad
    rgrad = riemannian_gradient_bucket(x, grad)
    if momentum_buffer is None:
        direction = rgrad
    else:
        if first_step:
            momentum_buffer.copy_(rgrad)
        else:
            momentum_buffer.mul_(momentum).add_(rgrad, alpha=1.0 - dampening)
        direction = rgrad.add_(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    return retract_and_transport(
        x, direction.mul(-lr), momentum_buffer, retraction=retraction,
        retraction_options=retraction_options, correct_drift=correct_drift,
    )
