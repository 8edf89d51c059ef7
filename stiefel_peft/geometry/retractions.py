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

from collections.abc import Callable

import torch

from ._validation import check_frame, check_like, identity_like, working_dtype
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
    return kernel(x.to(dtype), v.to(dtype), **options).to(x.dtype)


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
    # The 2p x 2p system is assembled from p x p blocks (V^T U = [[a, g], [-s, -a^T]] with
    # a = x^T P v, g = x^T x, s = (P v)^T P v) so the n-long products cost 6 n p^2 in all.
    # g is computed, not assumed to be I, so that y = Q x holds exactly for the given x.
    p = x.shape[-1]
    xtv = x.mT @ v  # (..., p, p)
    gram = x.mT @ x  # (..., p, p)
    projected = v - 0.5 * (x @ xtv)  # P v: (..., n, p)
    a = xtv - 0.5 * (gram @ xtv)  # x^T P v: (..., p, p)
    s = projected.mT @ projected  # (..., p, p)
    system = torch.cat(
        [torch.cat([a, gram], dim=-1), torch.cat([-s, -a.mT], dim=-1)], dim=-2
    )  # V^T U: (..., 2p, 2p)
    system = identity_like(x, 2 * p) - 0.5 * system
    right_side = torch.cat([gram, -a.mT], dim=-2)  # V^T x: (..., 2p, p)
    solution = torch.linalg.solve(system, right_side)  # (..., 2p, p)
    return x + projected @ solution[..., :p, :] + x @ solution[..., p:, :]


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


def _cayley_iterative(x: torch.Tensor, v: torch.Tensor, iterations: int = 2) -> torch.Tensor:
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"`iterations` must be an integer >= 1, got {iterations!r}")
    projected = v - 0.5 * (x @ (x.mT @ v))  # P v: (..., n, p)

    def apply_w(z: torch.Tensor) -> torch.Tensor:
        # W z = P v (x^T z) - x ((P v)^T z): four n x p x p products, no n x n matrix.
        return projected @ (x.mT @ z) - x @ (projected.mT @ z)

    y = x + apply_w(x)
    for _ in range(iterations):
        y = x + 0.5 * apply_w(x + y)
    return y


@register_retraction("cayley_iterative")
def retract_cayley_iterative(x: torch.Tensor, v: torch.Tensor, iterations: int = 2) -> torch.Tensor:
    r"""Cayley retraction by the fixed-point iteration of Li, Fuxin & Todorovic (ICLR 2020).

    .. math:: y_0 = x + W x, \qquad y_{k+1} = x + \tfrac12 W (x + y_k)

    converges to the exact Cayley point when ``||W||_2 < 2``, with error shrinking by about
    ``||W||_2 / 2`` per iteration; ``W`` is applied as ``U (V^T z)``. Approximate: with the
    default 2 iterations, ``||y^T y - I||_F <= 1e-6`` in float64 for ``||v||_F <= 1e-2``.

    Args: ``x``, ``v``: ``(..., n, p)``; ``iterations`` >= 1. Returns ``(..., n, p)``.
    Cost: O(n p^2) per iteration, matmul only.
    Raises ``ValueError`` on bad input.
    """
    return _apply(_cayley_iterative, x, v, iterations=iterations)


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


def _polar_newton_schulz(x: torch.Tensor, v: torch.Tensor, steps: int = 5) -> torch.Tensor:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an integer >= 1, got {steps!r}")
    a = x + v
    return a @ inverse_sqrt_newton_schulz(a.mT @ a, steps)  # (..., n, p) @ (..., p, p)


@register_retraction("polar_newton_schulz")
def retract_polar_newton_schulz(x: torch.Tensor, v: torch.Tensor, steps: int = 5) -> torch.Tensor:
    r"""Polar retraction by Newton-Schulz, matmul only (no SVD, QR or solve).

    .. math:: R_x(v) \approx (x + v)\, G^{-1/2}, \qquad G = (x+v)^\top (x+v)

    with ``G^{-1/2}`` from :func:`inverse_sqrt_newton_schulz`. For tangent ``v``,
    ``G = I + v^T v``, so a few steps suffice: with the default 5 steps,
    ``||y^T y - I||_F <= 1e-6`` in float64 for ``||v||_F <= 1e-2`` (and far beyond). For a
    badly conditioned ``x + v`` raise ``steps`` or use ``polar``.

    Args: ``x``, ``v``: ``(..., n, p)``; ``steps`` >= 1. Returns ``(..., n, p)``.
    Cost: O(n p^2) for the Gram matrix and the final product, O(p^3) per step.
    Raises ``ValueError`` on bad input.
    """
    return _apply(_polar_newton_schulz, x, v, steps=steps)


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
