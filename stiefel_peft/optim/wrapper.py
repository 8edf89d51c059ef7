"""RiemannianWrapper: any torch optimizer, made Riemannian for Stiefel parameters (research use)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stiefel_peft.geometry import RETRACTIONS

from .base import is_constrained, orthonormal_tolerance
from .buckets import frame_shape, oriented, working_dtype
from .functional import project_bucket, riemannian_gradient_bucket

__all__ = ["RiemannianWrapper"]


class RiemannianWrapper:
    r"""Wrap a torch optimizer so that its Stiefel parameters stay on the manifold.

    For every constrained parameter ``x`` with a gradient ``g`` (constrained: a param group of
    the inner optimizer with ``"stiefel": True``, or no ``"stiefel"`` key and
    ``stiefel_by_default``; and every Stiefel ``geoopt.ManifoldParameter``), one step is

    .. math::
        p.grad \leftarrow P_x(g),\quad x' = \mathrm{inner.step}(x),\quad
        y = R_x(P_x(x' - x)),\quad p.grad \leftarrow g

    i.e. the inner optimizer sees the Riemannian gradient (through a swapped ``p.grad``, put
    back afterwards, so ``p.grad`` is unchanged after ``step``), takes its Euclidean step, and
    its update is projected to the tangent space and retracted. Same-shape frames are stacked.
    Wide matrices use their transpose; half dtypes are computed in float32 (no master copy:
    this is the StelLA recipe, not :class:`StiefelAdam`).

    What happens to the inner optimizer's state: nothing. Its moments accumulate Riemannian
    gradients taken at different points and are never transported (as in StelLA), and any
    weight decay it applies is projected away with the rest of its update. Use
    :class:`StiefelAdam` / :class:`StiefelSGD` for transported moments.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the parameters.
        retraction: a registered retraction name (default ``"polar"``, as in StelLA).
        retraction_options: keyword options for the retraction.
        stiefel_by_default: whether groups without a ``"stiefel"`` key are constrained.

    Raises:
        ValueError: on an unknown retraction, a 1-D constrained parameter, a ManifoldParameter
            on another manifold, or a constrained parameter that is not orthonormal at its first
            step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        retraction: str = "polar",
        *,
        retraction_options: dict[str, Any] | None = None,
        stiefel_by_default: bool = True,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {optimizer!r}")
        if not isinstance(retraction, str) or retraction not in RETRACTIONS:
            raise ValueError(
                f"`retraction` must be one of {sorted(RETRACTIONS)}, got {retraction!r}"
            )
        self.optimizer = optimizer
        self.retraction = retraction
        self.retraction_options = dict(retraction_options or {})
        self.stiefel_by_default = stiefel_by_default
        self._checked: set[int] = set()
        for param in self.constrained_parameters():
            if param.dim() < 2:
                raise ValueError(
                    f"parameter of shape {tuple(param.shape)} is constrained to the Stiefel "
                    "manifold but is not a (..., n, p) matrix; give its group `'stiefel': False`"
                )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def constrained_parameters(self) -> list[torch.Tensor]:
        found = []
        for group in self.optimizer.param_groups:
            flags = {"stiefel": group.get("stiefel", self.stiefel_by_default)}
            found.extend(p for p in group["params"] if is_constrained(p, flags))
        return found

    def _check_first(self, points: torch.Tensor, params: list[torch.Tensor]) -> None:
        fresh = [i for i, p in enumerate(params) if id(p) not in self._checked]
        if not fresh:
            return
        gram = points.mT @ points  # (f, p, p)
        eye = torch.eye(points.shape[-1], dtype=points.dtype, device=points.device)
        errors = torch.linalg.matrix_norm(gram - eye).tolist()  # one sync, first step only
        for i in fresh:
            tolerance = orthonormal_tolerance(params[i].dtype, points.shape[-1])
            if not errors[i] <= tolerance:
                raise ValueError(
                    f"Stiefel parameter of shape {tuple(params[i].shape)} is not orthonormal "
                    f"(||x^T x - I||_F = {errors[i]:.3g} > {tolerance:.3g}); put it on the "
                    "manifold with stiefel_peft.geometry.orthonormalize before the first step"
                )
            self._checked.add(id(params[i]))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Riemannian gradient in, inner Euclidean step, tangent projection, retraction."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        for param in self.constrained_parameters():
            if param.grad is not None:
                key = (frame_shape(param), param.dtype, param.device)
                buckets.setdefault(key, []).append(param)
        saved = []  # (params, old points, original grads) per bucket
        for params in buckets.values():
            work = working_dtype(params[0].dtype)
            n, p = frame_shape(params[0])
            points = torch.cat([oriented(q).reshape(-1, n, p) for q in params]).to(work)
            self._check_first(points, params)
            grads = [q.grad for q in params]
            stacked = torch.cat([oriented(g).reshape(-1, n, p) for g in grads]).to(work)
            rgrad = riemannian_gradient_bucket(points, stacked)  # (f, n, p)
            counts = [oriented(q)[..., 0, 0].numel() for q in params]
            for q, chunk in zip(params, rgrad.split(counts), strict=True):
                tall = chunk.view(oriented(q).shape).to(q.dtype)
                q.grad = tall if q.shape == tall.shape else tall.mT
            saved.append((params, points, grads, counts))
        try:
            self.optimizer.step()
        finally:
            for params, _, grads, _ in saved:
                for q, grad in zip(params, grads, strict=True):
                    q.grad = grad
        for params, points, _, counts in saved:
            n, p = points.shape[-2:]
            moved = torch.cat([oriented(q).reshape(-1, n, p) for q in params]).to(points.dtype)
            update = project_bucket(points, moved - points)  # (f, n, p)
            new = RETRACTIONS[self.retraction](points, update, **self.retraction_options)
            targets = [oriented(q) for q in params]
            sources = [c.view(t.shape) for c, t in zip(new.split(counts), targets, strict=True)]
            torch._foreach_copy_(targets, sources)
        return loss
