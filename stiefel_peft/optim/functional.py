r"""Pure step functions on stacked buckets of Stiefel frames, local or sharded.

Every function takes ``(b, n, p)`` tensors (``b`` frames of one shape, ``n >= p``) in one working
dtype (float32 or float64), costs O(b n p^2) (plus O(b p^3) for small solves) and never forms an
n x n matrix. Moments are updated in place; the new point is returned. The classes in
:mod:`stiefel_peft.optim` hold the choices and the state and call these. The math is written
out in ``docs/optim.md``.

**Sharded frames.** Every whole-frame quantity of a step is a sum over the ``n`` rows
(``x^T v = sum_k x_k^T v_k``, ``||r||_F^2 = sum_k ||r_k||_F^2``), and the ``n x p`` updates
only combine rows with p x p coefficients. So one step serves both cases: ``reduce`` is None
for whole frames, or a callable that sums a tensor in place over the processes that hold the
other rows (:mod:`stiefel_peft.distributed` passes an all-reduce). The products of one phase
travel in one flat tensor: 2 reductions per ``"matrix"`` Adam step, 4 per ``"element"`` one.

**Guards.** Each step forms ``G = x^T x`` and the per-frame sum of the gradient anyway. A frame
whose gradient is not finite, or whose ``||G - I||_F`` exceeds ``limit`` (a factor edited off
the manifold), is left exactly as it was, point and moments: the p x p coefficients of its
update are masked to the identity (``y = x I + m 0``), so no host sync is needed. The caller
counts the skips and raises for off-manifold frames at its next check.

Nothing here synchronises with the host: no ``.item()``, no data-dependent Python branch, and
the 2p x 2p Cayley system is factorized with ``lu_factor_ex(check_errors=False)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from stiefel_peft.geometry import (
    RETRACTIONS,
    cayley_coefficients_orthonormal,
    newton_schulz_factor,
    orthonormalize,
    retract_cayley,
    sym,
)

SECOND_MOMENTS: tuple[str, ...] = ("matrix", "element")

Reduce = Callable[[torch.Tensor], object]  # sums its argument in place across processes


@dataclass(frozen=True)
class StepOutcome:
    """What one bucket step did: the new ``(b, n, p)`` frames and two ``(b,)`` flags."""

    point: torch.Tensor
    skipped: torch.Tensor  # bool: the gradient was not finite, the frame was left as it was
    off_manifold: torch.Tensor  # bool: ||x^T x - I||_F > limit, the frame was left as it was


def reduced_products(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    reduce: Reduce | None,
    squared_norms: Sequence[torch.Tensor] = (),
    sums: Sequence[torch.Tensor] = (),
) -> list[torch.Tensor]:
    r"""``[a^T b for (a, b) in pairs] + [||v||_F^2 for v in squared_norms] + [sum(v) ...]``.

    Per frame: ``(b, p, p)`` products, ``(b, 1, 1)`` squared norms and sums. With ``reduce``
    the local values are concatenated, summed across processes in one call, and split again.
    Cost: O(b n p^2) flops; ``b (len(pairs) p^2 + len(squared_norms) + len(sums))`` numbers
    reduced.
    """
    local = [torch.bmm(a.mT, b) for a, b in pairs]  # (b, p, p) each
    local += [
        torch.linalg.vector_norm(v, dim=(-2, -1), keepdim=True).square_() for v in squared_norms
    ]  # (b, 1, 1) each
    local += [v.sum(dim=(-2, -1), keepdim=True) for v in sums]  # (b, 1, 1) each
    if reduce is None:
        return local
    flat = torch.cat([t.reshape(-1) for t in local])  # one buffer per phase
    reduce(flat)
    sizes = [t.numel() for t in local]
    return [piece.view(t.shape) for piece, t in zip(flat.split(sizes), local, strict=True)]


def uses_fused_cayley(retraction: str) -> bool:
    """True when ``retraction`` is the package's exact Cayley map (not a user replacement)."""
    return retraction == "cayley" and RETRACTIONS.get("cayley") is retract_cayley


@dataclass(frozen=True)
class Guard:
    """Per-frame masks of one step, from ``G = x^T x`` and the sum of the gradient."""

    ok: torch.Tensor  # (b, 1, 1) bool: step this frame
    finite: torch.Tensor  # (b, 1, 1) bool: its gradient is finite
    on_manifold: torch.Tensor  # (b, 1, 1) bool: ||G - I||_F <= limit

    @classmethod
    def of(cls, gram: torch.Tensor, gradient_sum: torch.Tensor, limit: float) -> Guard:
        identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        error = torch.linalg.matrix_norm(gram - identity)[:, None, None]  # (b, 1, 1)
        finite = torch.isfinite(gradient_sum)  # one NaN or inf entry makes the sum non-finite
        on_manifold = error <= limit  # NaN compares False
        return cls(finite & on_manifold, finite, on_manifold)

    def outcome(self, point: torch.Tensor) -> StepOutcome:
        return StepOutcome(point, ~self.finite.view(-1), ~self.on_manifold.view(-1))


def _masked(ok: torch.Tensor, value: torch.Tensor, fallback: float | torch.Tensor) -> torch.Tensor:
    """``value`` where ``ok``, else ``fallback``: the per-frame selection of every guard."""
    return torch.where(ok, value, fallback)


def _per_frame(ok: torch.Tensor, value: float, fallback: float, like: torch.Tensor) -> torch.Tensor:
    """``(b, 1, 1)``: ``value`` for the frames to step, ``fallback`` for the guarded ones."""
    return torch.where(ok, torch.tensor(value, dtype=like.dtype, device=like.device), fallback)


def _first_phase(
    x: torch.Tensor, grad: torch.Tensor, maximize: bool, limit: float, reduce: Reduce | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Guard]:
    """``x^T g``, ``G = x^T x``, ``||g||_F^2`` (one reduction) and the guard.

    ``grad`` (a scratch copy) is negated under ``maximize`` and made finite (non-finite entries
    zeroed) in place; for the frames the guard stops, ``x^T g`` and ``||g||^2`` are zero.
    """
    if maximize:
        grad.neg_()
    x_t_g, gram, squared = reduced_products([(x, grad), (x, x)], reduce, [grad])
    guard = Guard.of(gram, squared, limit)  # a NaN or inf entry makes ||g||^2 non-finite
    torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
    return _masked(guard.ok, x_t_g, 0.0), gram, _masked(guard.ok, squared, 0.0), guard


def _frame_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b>_F`` per frame of ``(b, p, p)`` matrices: ``(b, 1, 1)``."""
    return (a * b).sum(dim=(-2, -1), keepdim=True)


def move(
    x: torch.Tensor,
    direction: torch.Tensor,
    scale: torch.Tensor,
    gram: torch.Tensor,
    guard: Guard,
    *,
    retraction: str,
    retraction_options: Mapping[str, object],
    reduce: Reduce | None = None,
    x_t_d: torch.Tensor | None = None,
    d_t_d: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``y = R_x(s d)`` frame by frame with a drift correction; returns ``y`` and ``y^T d``.

    Every step ends with one Newton-Schulz correction, so the drift a frame carries in from
    earlier steps is squared, never accumulated (``||y^T y - I||_F`` stays at the rounding
    level of one step).

    ``scale`` ``s`` is ``(b, 1, 1)`` (0 where ``guard.ok`` is False); ``direction`` ``d`` is
    ``(b, n, p)``. The package's ``"cayley"`` is fused: the exact Cayley map from the corrected
    frame ``x F`` (``F = (3I - G)/2``, one Newton-Schulz step folded into the coefficients),
    ``y = x (F C_1) + d (s C_2)``, with the coefficients of
    :func:`~stiefel_peft.geometry.cayley_coefficients_orthonormal` from ``s F x^T d`` and
    ``s^2 d^T d`` (pass ``x_t_d``, ``d_t_d`` when known): p x p work and one p x p inverse, and
    ``y^T d`` from p x p products. Any other name calls ``RETRACTIONS[retraction]`` followed
    by one explicit Newton-Schulz step (``y^T y``, ``y F`` and ``y^T d`` are n-long products).
    Guarded frames keep ``y = x`` exactly.

    Args:
        x, direction: ``(b, n, p)``; ``gram``: ``G = x^T x`` ``(b, p, p)``.
        reduce: see the module docstring (sharded frames need the fused Cayley).
        out: optional ``(b, n, p)`` buffer for the new frames (must not alias ``x``).

    Returns ``y`` ``(b, n, p)`` and ``y^T d`` ``(b, p, p)``. Cost: O(b n p^2) plus O(b p^3).
    """
    ok = guard.ok
    identity = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    if uses_fused_cayley(retraction):
        if x_t_d is None or d_t_d is None:
            x_t_d, d_t_d = reduced_products([(x, direction), (direction, direction)], reduce)
        # the Cayley map from x_hat = x F, F = (3I - G)/2 (x_hat^T x_hat = I + O(E^2)):
        # x_hat^T (s d) = s F x^T d, and the orthonormal-frame coefficients need one p x p solve
        fold = _masked(ok, newton_schulz_factor(gram), identity)  # F: (b, p, p)
        c1, c2 = cayley_coefficients_orthonormal((fold @ x_t_d) * scale, d_t_d * scale.square())
        c1 = _masked(ok, fold @ c1, identity)  # y = x (F C1) + d (s C2)
        c2 = _masked(ok, c2 * scale, 0.0)
        y = torch.bmm(x, c1, out=out).baddbmm_(direction, c2)  # (b, n, p)
        return y, torch.bmm(c1.mT, x_t_d).baddbmm_(c2.mT, d_t_d)  # y^T d from p x p products
    if reduce is not None:
        raise ValueError(
            f"sharded frames need the package's 'cayley' retraction, got {retraction!r}"
        )
    moved = RETRACTIONS[retraction](x, direction * scale, **retraction_options)
    y = torch.where(ok, moved, x)
    fold = _masked(ok, newton_schulz_factor(torch.bmm(y.mT, y)), identity)
    y = torch.bmm(y, fold)
    return y, torch.bmm(y.mT, direction)


def stiefel_adam_update(
    x: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    exp_avg_transport: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    second_moment: str,
    retraction: str,
    retraction_options: Mapping[str, object],
    maximize: bool,
    limit: float,
    reduce: Reduce | None = None,
    out: torch.Tensor | None = None,
) -> StepOutcome:
    r"""One Riemannian Adam step on a bucket; the state is updated in place.

    .. math::
        r = P_x(\pm g),\quad m \leftarrow \beta_1 \mathcal{T}(m) + (1-\beta_1) r,\quad
        v \leftarrow \beta_2 v + (1-\beta_2)\,\|r\|_F^2 \ \text{(matrix)}\ \text{or}\
        r \odot r\ \text{(element)}

    .. math::
        d = \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon},\quad
        u = -\eta\, d\ \text{(matrix: tangent already)}\ \text{or}\ -\eta P_x(d)\
        \text{(element)},\quad y = R_x(u)

    The projection transport of ``m`` to ``T_y``, ``m - y sym(y^T m)``, is deferred to the
    next step: ``exp_avg`` holds ``m`` as it was at ``x`` and ``exp_avg_transport`` the
    ``(b, p, p)`` product ``P = y^T m``, and the next step applies ``T(m) = m - x sym(P)``
    together with its own projection (``beta_1 (m - x sym P) + (1 - beta_1)(g - x sym(x^T g))``
    is one lerp and one n x p x p product). With ``second_moment="matrix"``,
    ``||r||_F^2 = ||g||^2 - 2 <S, x^T g> + <S, G S>`` (``S = sym(x^T g)``) and
    ``x^T m`` come from p x p products, so the default step needs six n-long products.
    Frames with a non-finite gradient or ``||x^T x - I||_F > limit`` are left as they were,
    point and state (see the module docstring).

    Args:
        x, exp_avg: ``(b, n, p)``.
        grad: ``(b, n, p)`` scratch copy of the gradient, overwritten.
        exp_avg_sq: ``(b, 1, 1)`` for ``second_moment="matrix"``, ``(b, n, p)`` for ``"element"``.
        exp_avg_transport: ``(b, p, p)``, the deferred transport (zeros for a new state).
        step: the 1-based step count shared by the bucket (bias correction).
        limit: the on-manifold guard on ``||x^T x - I||_F``.
        reduce, out: as :func:`move`.

    Returns a :class:`StepOutcome`. Cost: O(b n p^2).
    """
    x_t_g, gram, squared, guard = _first_phase(x, grad, maximize, limit, reduce)
    ok, okf = guard.ok, guard.ok.to(x.dtype)
    normal = sym(x_t_g)  # S: x S is the normal part of g
    pending = sym(exp_avg_transport)  # the deferred transport: m - x sym(P)
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
    options = {"retraction": retraction, "retraction_options": retraction_options,
               "reduce": reduce, "out": out}  # fmt: skip
    if second_moment == "matrix":
        # m <- beta1 (m - x T) + (1 - beta1)(g - x S): one lerp and one n x p x p product
        shift = (beta1 * pending + (1.0 - beta1) * normal) * okf  # (b, p, p), 0: guarded
        exp_avg.lerp_(grad, okf * (1.0 - beta1)).baddbmm_(x, shift, alpha=-1.0)
        x_t_m = beta1 * exp_avg_transport + (1.0 - beta1) * x_t_g - gram @ shift  # x^T m
        # ||g - x S||^2 from p x p products; clamped, as rounding may make it slightly negative
        r_squared = (
            squared - 2.0 * _frame_inner(normal, x_t_g) + _frame_inner(normal, gram @ normal)
        )
        updated = exp_avg_sq * beta2 + r_squared.clamp_min(0.0) * (1.0 - beta2)  # (b, 1, 1)
        exp_avg_sq.copy_(_masked(ok, updated, exp_avg_sq))
        denominator = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)  # (b, 1, 1)
        scale = _masked(ok, -step_size / denominator, 0.0)  # u = scale * m, a tangent step
        m_t_m = (
            reduced_products([(exp_avg, exp_avg)], reduce)[0]
            if uses_fused_cayley(retraction)
            else None
        )
        y, y_t_m = move(x, exp_avg, scale, gram, guard, x_t_d=x_t_m, d_t_d=m_t_m, **options)
    else:
        exp_avg.baddbmm_(x, pending * okf, alpha=-1.0)  # the deferred transport, then Adam
        rgrad = grad.baddbmm_(x, normal, alpha=-1.0).mul_(okf)  # r = 0 for guarded frames
        exp_avg.lerp_(rgrad, okf * (1.0 - beta1))
        exp_avg_sq.mul_(_per_frame(ok, beta2, 1.0, x)).addcmul_(rgrad, rgrad, value=1.0 - beta2)
        denominator = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        direction = torch.div(exp_avg, denominator).mul_(-step_size)
        # the element-wise preconditioned direction leaves T_x, so project it back
        (x_t_direction,) = reduced_products([(x, direction)], reduce)
        update = direction.baddbmm_(x, sym(x_t_direction), alpha=-1.0)  # P_x(d)
        x_t_update = x_t_direction - torch.bmm(gram, sym(x_t_direction))  # x^T P_x(d)
        fused = uses_fused_cayley(retraction)
        (u_t_u,) = reduced_products([(update, update)], reduce) if fused else (None,)
        one = _per_frame(ok, 1.0, 0.0, x)  # (b, 1, 1): the step is update itself
        y, _ = move(x, update, one, gram, guard, x_t_d=x_t_update, d_t_d=u_t_u, **options)
        (y_t_m,) = reduced_products([(y, exp_avg)], reduce)
    exp_avg_transport.copy_(_masked(ok, y_t_m, exp_avg_transport))
    return guard.outcome(y)


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
    maximize: bool,
    limit: float,
    out: torch.Tensor | None = None,
) -> StepOutcome:
    r"""One Riemannian SGD (heavy-ball / Nesterov) step on a bucket.

    .. math::
        r = P_x(\pm g),\quad b \leftarrow r\ \text{(first step)}\ \text{else}\
        \mu b + (1-\tau) r,\quad d = r + \mu b\ \text{(Nesterov)}\ \text{or}\ b,\quad
        y = R_x(-\eta d),\quad b \leftarrow P_y(b)

    ``momentum_buffer`` (``(b, n, p)``, or None when ``momentum == 0``) is updated in place;
    ``grad`` is a scratch copy (overwritten). Guarded frames are left as they were.
    Returns a :class:`StepOutcome`. Cost: O(b n p^2).
    """
    x_t_g, gram, _, guard = _first_phase(x, grad, maximize, limit, None)
    ok, okf = guard.ok, guard.ok.to(x.dtype)
    rgrad = grad.baddbmm_(x, sym(x_t_g), alpha=-1.0)  # g - x sym(x^T g), in place
    if momentum_buffer is None:
        direction = rgrad
    else:
        if first_step:
            momentum_buffer.lerp_(rgrad, okf)  # b = r (ok frames), unchanged otherwise
        else:
            momentum_buffer.mul_(_per_frame(ok, momentum, 1.0, x))
            momentum_buffer.add_(rgrad * (okf * (1.0 - dampening)))
        direction = rgrad.add_(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    scale = _per_frame(ok, -lr, 0.0, x)  # (b, 1, 1)
    y, y_t_d = move(
        x, direction, scale, gram, guard, retraction=retraction,
        retraction_options=retraction_options, out=out,
    )  # fmt: skip
    if momentum_buffer is not None:
        y_t_b = y_t_d if direction is momentum_buffer else torch.bmm(y.mT, momentum_buffer)
        momentum_buffer.baddbmm_(y, sym(y_t_b) * okf, alpha=-1.0)  # b - y sym(y^T b)
    return guard.outcome(y)


def orthogonality_errors(x: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
    r"""``||x^T x - I||_F`` per frame of ``(b, n, p)`` (local or row-sharded) frames: ``(b,)``.

    Cost: O(b n p^2), one reduction of ``(b, p, p)``.
    """
    (gram,) = reduced_products([(x, x)], reduce)
    identity = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.linalg.matrix_norm(gram - identity)


def orthonormalized(x: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
    r"""The polar factor ``x (x^T x)^{-1/2}`` of each full-rank frame of ``(b, n, p)``.

    Whole frames use the SVD (:func:`~stiefel_peft.geometry.orthonormalize`); row-sharded ones
    the ``eigh`` of the reduced ``p x p`` Gram matrix, so their local rows need no gather.
    Cost: O(b n p^2 + b p^3).
    """
    if reduce is None:
        return orthonormalize(x)
    (gram,) = reduced_products([(x, x)], reduce)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # (b, p), (b, p, p)
    inverse_root = (eigenvectors * eigenvalues.rsqrt().unsqueeze(-2)) @ eigenvectors.mT
    return torch.bmm(x, inverse_root)  # (b, n, p)
