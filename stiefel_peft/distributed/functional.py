"""The Stiefel Adam step on frames sharded along their long dimension ``n``.

Each process holds rows ``x_k`` (``(b, n_k, p)``, ``sum_k n_k = n``) of ``b`` frames, with the
matching rows of the gradient and of the ``(b, n_k, p)`` moments. Every whole-frame quantity the
step needs is a sum over ``n``: ``x^T v = sum_k x_k^T v_k`` and ``||r||_F^2 = sum_k ||r_k||_F^2``.
So each is a local product followed by one ``all_reduce(SUM)`` of a ``(b, p, p)`` (or
``(b, 1, 1)``) result, and the products of one phase travel in one flat tensor; the ``n x p``
updates (``g - x S``, ``x C_1 + m C_2``, the transport) stay local because the ``p x p``
coefficients are the same on every process. No frame is ever gathered.

The math is :func:`stiefel_peft.optim.functional.stiefel_adam_update` with the package's fused
Cayley retraction; only the order of the floating-point sums differs (fp32 tolerance).
``all_reduce`` is any callable that sums a tensor in place over the processes sharing the
frames (``lambda t: torch.distributed.all_reduce(t, group=g)``); with the identity the
functions are the unsharded step, which is how the CPU tests check the algebra.

Collectives per step: 2 (``second_moment="matrix"``) or 4 (``"element"``), one more on a
drift-correction step for ``"matrix"``. Largest reduced tensor: ``2 b p^2`` elements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from stiefel_peft.optim.functional import cayley_coefficients, symmetric_part

__all__ = [
    "AllReduce",
    "reduced_products",
    "sharded_orthogonality_error",
    "sharded_orthonormalize",
    "sharded_stiefel_adam_update",
]

AllReduce = Callable[[torch.Tensor], object]  # sums its argument in place across processes


def reduced_products(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    all_reduce: AllReduce,
    squared_norms: Sequence[torch.Tensor] = (),
) -> list[torch.Tensor]:
    r"""``[sum_k a_k^T b_k for (a, b) in pairs] + [sum_k ||v_k||_F^2 for v in squared_norms]``.

    Local ``(b, n_k, p)`` operands; one ``all_reduce`` of the concatenation of the flattened
    ``(b, p, p)`` products and ``(b, 1, 1)`` squared norms. Returns them in that order.
    Cost: O(b n_k p^2) local flops, ``b (len(pairs) p^2 + len(squared_norms))`` reduced numbers.
    """
    local = [torch.bmm(a.mT, b) for a, b in pairs]  # (b, p, p) each
    local += [
        torch.linalg.vector_norm(v, dim=(-2, -1), keepdim=True).square_()  # (b, 1, 1)
        for v in squared_norms
    ]
    flat = torch.cat([t.reshape(-1) for t in local])  # one buffer per phase
    all_reduce(flat)
    sizes = [t.numel() for t in local]
    return [piece.view(t.shape) for piece, t in zip(flat.split(sizes), local, strict=True)]


def sharded_orthogonality_error(x: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
    r"""``||x^T x - I||_F`` per frame of row-sharded ``(b, n_k, p)`` frames: ``(b,)``.

    One all-reduce of ``(b, p, p)``. Cost: O(b n_k p^2).
    """
    (gram,) = reduced_products([(x, x)], all_reduce)
    identity = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return torch.linalg.matrix_norm(gram - identity)


def sharded_orthonormalize(x: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
    r"""Polar factor ``x (x^T x)^{-1/2}`` of row-sharded ``(b, n_k, p)`` frames (full rank).

    ``(x^T x)^{-1/2} = V diag(lambda)^{-1/2} V^T`` from the ``eigh`` of the all-reduced
    ``p x p`` Gram matrix, so the local rows of the polar factor need no gather.
    Cost: O(b n_k p^2 + b p^3), one all-reduce of ``(b, p, p)``.
    """
    (gram,) = reduced_products([(x, x)], all_reduce)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # (b, p), (b, p, p)
    inverse_root = (eigenvectors * eigenvalues.rsqrt().unsqueeze(-2)) @ eigenvectors.mT
    return torch.bmm(x, inverse_root)  # (b, n_k, p)


def sharded_stiefel_adam_update(
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
    correct_drift: bool,
    maximize: bool,
    all_reduce: AllReduce,
) -> torch.Tensor:
    r"""One Riemannian Adam step with fused Cayley on row-sharded frames; moments in place.

    Same equations as :func:`stiefel_peft.optim.functional.stiefel_adam_update` (see
    ``docs/optim.md``). Phases (one all-reduce each):

    - ``"matrix"``: ``[x^T g, x^T x]``; then ``[||r||^2, x^T m, m^T m]``; with drift correction
      ``[y^T y]``. ``y^T m`` is assembled from p x p products.
    - ``"element"``: ``[x^T g, x^T x]``; ``[x^T d]``; ``[u^T u]``; ``[y^T y, y^T m]``.

    Args:
        x, grad, exp_avg: local ``(b, n_k, p)`` rows (``n_k`` may be 0 on some process).
        exp_avg_sq: ``(b, 1, 1)`` (replicated on every process) for ``"matrix"``, the local
            ``(b, n_k, p)`` rows for ``"element"``.
        all_reduce: sums a tensor in place over the processes that share the frames.

    Returns the local ``(b, n_k, p)`` rows of the new frames. Cost: O(b n_k p^2 + b p^3).
    """
    if maximize:
        grad = -grad
    x_t_g, gram = reduced_products([(x, grad), (x, x)], all_reduce)
    rgrad = torch.baddbmm(grad, x, symmetric_part(x_t_g), alpha=-1.0)  # local rows of P_x(g)
    exp_avg.lerp_(rgrad, 1.0 - beta1)
    step_size = lr / (1.0 - beta1**step)
    bias_correction2_sqrt = (1.0 - beta2**step) ** 0.5
    if second_moment == "matrix":
        x_t_m, m_t_m, squared_norm = reduced_products(
            [(x, exp_avg), (exp_avg, exp_avg)], all_reduce, [rgrad]
        )
        exp_avg_sq.mul_(beta2).add_(squared_norm, alpha=1.0 - beta2)  # (b, 1, 1)
        scale = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps).reciprocal_()
        scale = scale.mul_(-step_size)  # u = scale * m: (b, 1, 1)
        c1, c2 = cayley_coefficients(gram, x_t_m * scale, m_t_m * scale.square())
        c2 = c2.mul_(scale)  # y = x C1 + m (s C2)
        y = torch.bmm(x, c1).baddbmm_(exp_avg, c2)  # local rows: (b, n_k, p)
        y_t_m = torch.bmm(c1.mT, x_t_m).baddbmm_(c2.mT, m_t_m)  # y^T m from p x p products
        if correct_drift:
            (y_t_y,) = reduced_products([(y, y)], all_reduce)
            factor = _newton_schulz_factor(y_t_y)
            y = torch.bmm(y, factor)
            y_t_m = torch.bmm(factor, y_t_m)  # (y F)^T m = F (y^T m), F symmetric
        exp_avg.baddbmm_(y, symmetric_part(y_t_m), alpha=-1.0)  # transport to T_y
        return y
    exp_avg_sq.mul_(beta2).addcmul_(rgrad, rgrad, value=1.0 - beta2)  # local (b, n_k, p)
    denominator = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    direction = torch.div(exp_avg, denominator).mul_(-step_size)
    (x_t_direction,) = reduced_products([(x, direction)], all_reduce)
    update = direction.baddbmm_(x, symmetric_part(x_t_direction), alpha=-1.0)  # P_x(d)
    x_t_update = x_t_direction - torch.bmm(gram, symmetric_part(x_t_direction))  # x^T P_x(d)
    (u_t_u,) = reduced_products([(update, update)], all_reduce)
    c1, c2 = cayley_coefficients(gram, x_t_update, u_t_u)
    y = torch.bmm(x, c1).baddbmm_(update, c2)  # local rows: (b, n_k, p)
    pairs = [(y, exp_avg)] + ([(y, y)] if correct_drift else [])
    products = reduced_products(pairs, all_reduce)
    y_t_m = products[0]
    if correct_drift:
        factor = _newton_schulz_factor(products[1])
        y = torch.bmm(y, factor)
        y_t_m = torch.bmm(factor, y_t_m)
    exp_avg.baddbmm_(y, symmetric_part(y_t_m), alpha=-1.0)  # transport to T_y
    return y


def _newton_schulz_factor(gram: torch.Tensor) -> torch.Tensor:
    """``(3 I - y^T y) / 2`` from the reduced ``(b, p, p)`` Gram matrix (see optim.functional)."""
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return identity.mul(1.5) - 0.5 * gram
