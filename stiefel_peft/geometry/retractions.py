"""Retractions on the Stiefel manifold and the registry that names them.

A retraction maps a point ``x`` (``(..., n, p)``, ``x^T x = I_p``) and a tangent vector ``v``
to a point ``R_x(v)`` on the manifold with ``R_x(0) = x`` and ``d/dt R_x(t v)|_{t=0} = v``.
Every map here costs O(n p^2) per matrix (plus O(p^3) for small factorizations) and never
forms an n x n matrix. Half-precision inputs are computed in float32 and returned in their
dtype.

Researchers add their own with :func:`register_retraction`; every consumer (the optimizers,
the geoopt manifold, the benchmarks) then accepts the new name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._validation import broadcast_frames, check_frame, check_like, identity_like, working_dtype
from .kernels import cayley_coefficients
from .projections import skew

Retraction = Callable[..., torch.Tensor]
RETRACTIONS: dict[str, Retraction] = {}


def register_retraction(name: str, *, replace: bool = False) -> Callable[[Retraction], Retraction]:
    """Decorator that adds ``function(x, v, **options) -> y`` to :data:`RETRACTIONS`.

    The function receives validated tensors in the working dtype (float32 for half inputs,
    when called through :func:`retract`) and must return a ``(..., n, p)`` tensor.

    Raises:
        ValueError: if ``name`` is not a non-empty string, or is taken and ``replace`` is False.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    if name in RETRACTIONS and not replace:
        raise ValueError(
            f"a retraction named {name!r} is already registered; pick another name or pass "
            "`replace=True`"
        )

    def decorator(function: Retraction) -> Retraction:
        RETRACTIONS[name] = function
        return function

    return decorator


def check_retraction(method: str) -> Retraction:
    """The registered function for ``method``; ``ValueError`` listing the names otherwise."""
    try:
        return RETRACTIONS[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"`method` must name a registered retraction, one of {sorted(RETRACTIONS)}; got "
            f"{method!r} (add your own with `register_retraction`)"
        ) from None


def _apply(kernel: Retraction, x: torch.Tensor, v: torch.Tensor, **options: object) -> torch.Tensor:
    check_frame(x, "x")
    check_like(x, v, "v")
    dtype = working_dtype(x.dtype)
    x_w, v_w = broadcast_frames(x.to(dtype), v.to(dtype))
    return kernel(x_w, v_w, **options).to(x.dtype)


def approximation_tolerance(dtype: torch.dtype, p: int) -> float:
    """Default acceptance bound of the approximate retractions on ``||y^T y - x^T x||_F``:
    ``64 eps(dtype) sqrt(p)`` (about 4e-5 in float32 and 7e-14 in float64 at p = 32)."""
    return 64.0 * torch.finfo(dtype).eps * math.sqrt(p)


def _check_tolerance(tolerance: float | None, x: torch.Tensor) -> float:
    if tolerance is None:
        return approximation_tolerance(x.dtype, x.shape[-1])
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(
            f"`tolerance` must be a positive number (or None for the default), got {tolerance!r}"
        )
    return float(tolerance)


def _accept_or_fall_back(
    approximate: torch.Tensor,
    error: torch.Tensor,
    tolerance: float,
    exact: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """Keep ``approximate`` where ``error <= tolerance``; elsewhere take ``exact()``.

    ``error``: ``(...)``, one value per frame (NaN counts as too large). One host sync; the
    exact map runs (on the whole batch) only when some frame fails.
    """
    failed = ~(error <= tolerance)  # (...): NaN fails too
    if not bool(failed.any()):  # the acceptance check: one host sync
        return approximate
    return torch.where(failed[..., None, None], exact(), approximate)


def retract(
    x: torch.Tensor, v: torch.Tensor, method: str = "cayley", **options: object
) -> torch.Tensor:
    """Apply the retraction registered as ``method`` (see :data:`RETRACTIONS`).

    Args:
        x: ``(..., n, p)`` point.
        v: ``(..., n, p)`` tangent vector at ``x``, same dtype.
        method: a registered name: ``qr``, ``cayley``, ``cayley_iterative``, ``polar``,
            ``polar_newton_schulz``, ``exp`` or one added by :func:`register_retraction`.
        **options: passed to the retraction (for example ``iterations=``).

    Raises:
        ValueError: on an unknown method or a wide, non-floating or mismatched input.
    """
    function = check_retraction(method)
    return _apply(function, x, v, **options)


# --- QR ---------------------------------------------------------------------------------


def qr_positive(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR ``a = q r`` with ``diag(r) >= 0``, which makes the factorization unique.

    ``a``: ``(..., n, p)``, n >= p. Cost: O(n p^2).
    """
    q, r = torch.linalg.qr(a)  # q: (..., n, p), r: (..., p, p)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)  # a zero pivot keeps its column
    return q * sign.unsqueeze(-2), r * sign.unsqueeze(-1)


def _qr(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return qr_positive(x + v)[0]


@register_retraction("qr")
def retract_qr(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""Sign-fixed QR retraction, first order.

    .. math:: R_x(v) = \mathrm{qf}(x + v), \quad x + v = \mathrm{qf}(x+v)\, r,\ \mathrm{diag}(r) > 0

    Args: ``x``, ``v``: ``(..., n, p)``. Returns ``(..., n, p)``. Cost: O(n p^2) (Householder QR).
    Raises ``ValueError`` on bad input.
    """
    return _apply(_qr, x, v)


# --- Cayley -----------------------------------------------------------------------------


def cayley_factors(x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Low-rank factors ``W = U V^T`` of the skew matrix used by the Cayley retraction.

    With ``P = I - x x^T / 2`` (never formed): ``W = P v x^T - x v^T P``,
    ``U = [P v, x]``, ``V = [x, -P v]``, both ``(..., n, 2p)``. ``W`` is skew for any ``v``
    and ``W x = v`` for tangent ``v``. Cost: O(n p^2).
    """
    projected = v - 0.5 * (x @ (x.mT @ v))  # P v: (..., n, p)
    left = torch.cat([projected, x], dim=-1)  # U: (..., n, 2p)
    right = torch.cat([x, -projected], dim=-1)  # V: (..., n, 2p)
    return left, right


def _cayley(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # y = x C1 + v C2 with p x p coefficients from G = x^T x, B = x^T v, S = v^T v (5 n p^2).
    # G is computed, not assumed to be I, so that y = Q x holds exactly for the given x.
    c1, c2 = cayley_coefficients(x.mT @ x, x.mT @ v, v.mT @ v)
    return x @ c1 + v @ c2


@register_retraction("cayley")
def retract_cayley(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""Exact Cayley retraction through the 2p x 2p Woodbury form.

    .. math::
        R_x(v) = (I - \tfrac12 W)^{-1}(I + \tfrac12 W)\,x
               = x + U\,(I_{2p} - \tfrac12 V^\top U)^{-1} V^\top x

    with ``W = U V^T`` from :func:`cayley_factors`. The result is ``Q x`` for an orthogonal
    ``Q``, so it keeps ``x``'s orthonormality (to rounding) for any ``v``; second order for
    tangent ``v``.

    Args: ``x``, ``v``: ``(..., n, p)``. Returns ``(..., n, p)``.
    Cost: O(n p^2) for the products plus O(p^3) for one 2p x 2p solve; no n x n matrix.
    Raises ``ValueError`` on bad input.
    """
    return _apply(_cayley, x, v)


def _cayley_iterative(
    x: torch.Tensor, v: torch.Tensor, iterations: int = 2, tolerance: float | None = None
) -> torch.Tensor:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"`iterations` must be an integer >= 1, got {iterations!r}")
    limit = _check_tolerance(tolerance, x)
    projected = v - 0.5 * (x @ (x.mT @ v))  # P v: (..., n, p)

    def apply_w(z: torch.Tensor) -> torch.Tensor:
        # W z = P v (x^T z) - x ((P v)^T z): four n x p x p products, no n x n matrix.
        return projected @ (x.mT @ z) - x @ (projected.mT @ z)

    y = x + apply_w(x)
    for _ in range(iterations):
        y = x + 0.5 * apply_w(x + y)
    # The exact Cayley point keeps x^T x; how far y is from doing so is its error.
    error = torch.linalg.matrix_norm(y.mT @ y - x.mT @ x)  # (...)
    return _accept_or_fall_back(y, error, limit, lambda: _cayley(x, v))


@register_retraction("cayley_iterative")
def retract_cayley_iterative(
    x: torch.Tensor, v: torch.Tensor, iterations: int = 2, tolerance: float | None = None
) -> torch.Tensor:
    r"""Cayley retraction by the fixed-point iteration of Li, Fuxin & Todorovic (ICLR 2020).

    .. math:: y_0 = x + W x, \qquad y_{k+1} = x + \tfrac12 W (x + y_k)

    converges to the exact Cayley point when ``||W||_2 < 2``, with error shrinking by about
    ``||W||_2 / 2`` per iteration; ``W`` is applied as ``U (V^T z)``. Approximate, so every
    result is checked: a frame with ``||y^T y - x^T x||_F > tolerance`` (the exact map keeps
    ``x^T x``) is replaced by the exact :func:`retract_cayley`, so a step outside the
    iteration's convergence region never leaves the manifold. With the default 2 iterations
    the check passes for ``||v||_F`` up to about 1e-3 (float64) or 1e-1 (float32).

    Args:
        x: ``(..., n, p)`` point.
        v: ``(..., n, p)`` tangent vector; leading dimensions broadcast.
        iterations: fixed-point iterations, >= 1.
        tolerance: acceptance bound on ``||y^T y - x^T x||_F`` (None: 64 eps sqrt(p) of the
            working dtype, :func:`approximation_tolerance`).

    Returns ``(..., n, p)``. Cost: O(n p^2) per iteration, matmul only, plus the check (one
    host sync) and, for a failed frame, the exact map.
    Raises ``ValueError`` on bad input.
    """
    return _apply(_cayley_iterative, x, v, iterations=iterations, tolerance=tolerance)


# --- Polar ------------------------------------------------------------------------------


def _polar(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    left, _, right_h = torch.linalg.svd(x + v, full_matrices=False)  # (..., n, p), (..., p, p)
    return left @ right_h


@register_retraction("polar")
def retract_polar(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""Polar retraction: the nearest point of the manifold to ``x + v`` (Frobenius norm).

    .. math:: R_x(v) = U V^\top \quad\text{where } x + v = U \Sigma V^\top \text{ (thin SVD)}

    Second order. Args: ``x``, ``v``: ``(..., n, p)``. Returns ``(..., n, p)``.
    Cost: O(n p^2) (thin SVD). Raises ``ValueError`` on bad input.
    """
    return _apply(_polar, x, v)


def inverse_sqrt_newton_schulz(gram: torch.Tensor, steps: int) -> torch.Tensor:
    r"""``gram^{-1/2}`` of symmetric positive definite ``(..., p, p)`` matrices, matmul only.

    Coupled Newton-Schulz iteration on ``A = gram / c`` with ``c = ||gram||_inf >= lambda_max``
    (so the spectrum of ``A`` lies in (0, 1]):
    ``T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z`` from ``Y = A, Z = I``; ``Z -> A^{-1/2}``.
    Converges quadratically once ``||I - A|| < 1``. Cost: O(p^3) per step.
    """
    scale = gram.abs().sum(-1).amax(-1).clamp_min(torch.finfo(gram.dtype).tiny)  # (...,)
    y = gram / scale[..., None, None]
    identity = identity_like(gram, gram.shape[-1])
    z = identity.expand_as(gram)
    for _ in range(steps):
        t = 1.5 * identity - 0.5 * (z @ y)
        y = y @ t
        z = t @ z
    return z / scale.sqrt()[..., None, None]


def _polar_newton_schulz(
    x: torch.Tensor, v: torch.Tensor, steps: int = 5, tolerance: float | None = None
) -> torch.Tensor:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1, got {steps!r}")
    limit = _check_tolerance(tolerance, x)
    a = x + v
    gram = a.mT @ a  # (..., p, p)
    inverse_root = inverse_sqrt_newton_schulz(gram, steps)  # Z ~ G^{-1/2}: (..., p, p)
    # (a Z)^T (a Z) = Z G Z: the result's orthonormality error from p x p products alone
    identity = identity_like(x, x.shape[-1])
    error = torch.linalg.matrix_norm(inverse_root.mT @ gram @ inverse_root - identity)
    return _accept_or_fall_back(a @ inverse_root, error, limit, lambda: _polar(x, v))


@register_retraction("polar_newton_schulz")
def retract_polar_newton_schulz(
    x: torch.Tensor, v: torch.Tensor, steps: int = 5, tolerance: float | None = None
) -> torch.Tensor:
    r"""Polar retraction by Newton-Schulz, matmul only (no SVD, QR or solve) when it converges.

    .. math:: R_x(v) \approx (x + v)\, G^{-1/2}, \qquad G = (x+v)^\top (x+v)

    with ``G^{-1/2}`` from :func:`inverse_sqrt_newton_schulz`. For tangent ``v``,
    ``G = I + v^T v``, so a few steps suffice for small steps. Every result is checked from
    p x p products (``||Z G Z - I||_F`` with ``Z`` the computed ``G^{-1/2}``): a frame above
    ``tolerance`` (a large or badly conditioned step, where the iteration has not converged)
    is replaced by the SVD-based :func:`retract_polar`, so it never leaves the manifold.

    Args:
        x: ``(..., n, p)`` point.
        v: ``(..., n, p)`` tangent vector; leading dimensions broadcast.
        steps: Newton-Schulz steps, >= 1.
        tolerance: acceptance bound on ``||y^T y - I||_F`` (None: 64 eps sqrt(p) of the
            working dtype, :func:`approximation_tolerance`).

    Returns ``(..., n, p)``. Cost: O(n p^2) for the Gram matrix and the final product,
    O(p^3) per step, the check (one host sync) and, for a failed frame, the SVD polar map.
    Raises ``ValueError`` on bad input.
    """
    return _apply(_polar_newton_schulz, x, v, steps=steps, tolerance=tolerance)


# --- Exponential map (Euclidean metric) -------------------------------------------------


def _exp(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    p = x.shape[-1]
    a = skew(x.mT @ v)  # x^T v, skew for tangent v: (..., p, p)
    s = v.mT @ v  # (..., p, p)
    identity = identity_like(x, p).expand_as(a)
    block = torch.cat(
        [torch.cat([a, -s], dim=-1), torch.cat([identity, a], dim=-1)], dim=-2
    )  # (..., 2p, 2p)
    tail = torch.cat([torch.linalg.matrix_exp(-a), torch.zeros_like(a)], dim=-2)  # (..., 2p, p)
    coefficients = torch.linalg.matrix_exp(block) @ tail  # (..., 2p, p)
    return x @ coefficients[..., :p, :] + v @ coefficients[..., p:, :]


@register_retraction("exp")
def retract_exp(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""The exponential map of the Euclidean (embedded) metric: the geodesic through ``x``.

    Edelman, Arias & Smith (1998), with ``A = x^T v`` (skew) and ``S = v^T v``:

    .. math::
        \mathrm{Exp}_x(v) = [x,\ v]\, \exp\!\begin{pmatrix} A & -S \\ I & A \end{pmatrix}
        \begin{pmatrix} \exp(-A) \\ 0 \end{pmatrix}

    ``v`` must be tangent (only the skew part of ``x^T v`` is used). Args: ``x``, ``v``:
    ``(..., n, p)``. Returns ``(..., n, p)``.
    Cost: O(n p^2) plus 2p x 2p and p x p matrix exponentials (O(p^3)).
    Raises ``ValueError`` on bad input.
    """
    return _apply(_exp, x, v)


def geodesic_canonical(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""The exponential map of the canonical metric (Edelman, Arias & Smith 1998, eq. 2.42).

    With ``A = x^T v`` (skew) and the thin QR ``q r = (I - x x^T) v``:

    .. math::
        \mathrm{Exp}^c_x(v) = [x,\ q]\, \exp\!\begin{pmatrix} A & -r^\top \\ r & 0 \end{pmatrix}
        \begin{pmatrix} I \\ 0 \end{pmatrix}

    Args: ``x``, ``v``: ``(..., n, p)``, already in a working dtype. Returns ``(..., n, p)``.
    Cost: O(n p^2) plus one 2p x 2p matrix exponential.
    """
    p = x.shape[-1]
    a = skew(x.mT @ v)  # (..., p, p)
    q, r = torch.linalg.qr(v - x @ a)  # the normal part of v: (..., n, p), (..., p, p)
    block = torch.cat(
        [torch.cat([a, -r.mT], dim=-1), torch.cat([r, torch.zeros_like(r)], dim=-1)], dim=-2
    )  # (..., 2p, 2p)
    coefficients = torch.linalg.matrix_exp(block)[..., :, :p]  # (..., 2p, p)
    return x @ coefficients[..., :p, :] + q @ coefficients[..., p:, :]
