"""RiemannianWrapper: any torch optimizer, made Riemannian for Stiefel parameters (research use)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain
from typing import Any

import torch

from stiefel_peft.geometry import RETRACTIONS, orthogonality_error, project_tangent

from .buckets import frame_shape, oriented, working_dtype
from .checks import (
    NONFINITE_POLICIES,
    check_manifold_choices,
    check_retraction_options,
    is_constrained,
    nonfinite_message,
    off_manifold_message,
    orientation_fix,
    orthonormal_tolerance,
)

__all__ = ["RiemannianWrapper"]

_STATE_KEY = "riemannian_wrapper"


class RiemannianWrapper(torch.optim.Optimizer):
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

    It is a ``torch.optim.Optimizer``: ``param_groups`` and ``state`` are the inner optimizer's
    own (shared, not copied), so learning-rate schedulers, ``add_param_group`` and
    ``transformers.Trainer`` work on it as on the inner optimizer; ``state_dict`` is the inner
    one's plus the skip counts.

    What happens to the inner optimizer's state: nothing. Its moments accumulate Riemannian
    gradients taken at different points and are never transported (as in StelLA), and any
    weight decay it applies is projected away with the rest of its update. Use
    :class:`StiefelAdam` / :class:`StiefelSGD` for transported moments.

    Non-finite gradients (``nonfinite``): the inner optimizer is a black box, so the policy is
    decided on the host, one sync per step. ``"skip"`` hides a constrained parameter whose
    gradient holds a NaN or inf from the inner step (``p.grad`` is None during it, so the
    inner optimizer leaves it and its state alone) and counts it; ``"raise"`` raises
    ``ValueError`` before anything is changed.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the parameters.
        retraction: a registered retraction name (default ``"polar"``, as in StelLA).
        retraction_options: keyword options for the retraction.
        stiefel_by_default: whether groups without a ``"stiefel"`` key are constrained.
        nonfinite: ``"skip"`` (default) or ``"raise"``.

    Raises:
        ValueError: on an unknown retraction or policy, a 1-D constrained parameter, a
            ManifoldParameter on another manifold or with another metric or retraction, a
            constrained parameter that is not orthonormal at its first step, or
            (``nonfinite="raise"``) a non-finite gradient.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        retraction: str = "polar",
        *,
        retraction_options: dict[str, Any] | None = None,
        stiefel_by_default: bool = True,
        nonfinite: str = "skip",
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"`optimizer` must be a torch.optim.Optimizer, got {optimizer!r}")
        if isinstance(optimizer, RiemannianWrapper):
            raise ValueError("`optimizer` is already a RiemannianWrapper; wrap the inner one once")
        if not isinstance(retraction, str) or retraction not in RETRACTIONS:
            raise ValueError(
                f"`retraction` must be one of {sorted(RETRACTIONS)}, got {retraction!r}"
            )
        check_retraction_options(retraction, dict(retraction_options or {}))
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"`nonfinite` must be 'skip' or 'raise', got {nonfinite!r}")
        self.optimizer = optimizer
        self.retraction = retraction
        self.retraction_options = dict(retraction_options or {})
        self.stiefel_by_default = stiefel_by_default
        self.nonfinite = nonfinite
        self._checked: set[int] = set()
        self._skips: dict[int, int] = {}
        # torch's own setup (hooks, step patching); param_groups and state below are the inner
        # optimizer's own objects, whatever torch's __init__ or load_state_dict assigns
        super().__init__(optimizer.param_groups, optimizer.defaults)
        for group in self.param_groups:
            self._check_group(group)

    # --- the inner optimizer's groups, state and gradients ------------------------------
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        pass  # torch's __init__ assigns an empty list: the inner optimizer's groups stay

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        pass  # as for param_groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (checked like the others)."""
        if any(param_group is group for group in self.optimizer.param_groups):
            return  # torch's __init__ registering the inner optimizer's own groups
        self.optimizer.add_param_group(param_group)
        try:
            self._check_group(self.optimizer.param_groups[-1])
        except ValueError:
            self.optimizer.param_groups.pop()
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        saved = self.optimizer.state_dict()
        order = {id(p): i for i, p in enumerate(self._all_parameters())}
        saved[_STATE_KEY] = {"nonfinite_skips": {order[k]: v for k, v in self._skips.items()}}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        own = state_dict.pop(_STATE_KEY, {"nonfinite_skips": {}})
        self.optimizer.load_state_dict(state_dict)
        params = self._all_parameters()
        self._skips = {id(params[int(i)]): int(v) for i, v in own["nonfinite_skips"].items()}

    def nonfinite_skips(self) -> int:
        """Steps skipped for a non-finite gradient, summed over the constrained parameters."""
        return sum(self._skips.values())

    def _all_parameters(self) -> list[torch.Tensor]:
        return list(chain.from_iterable(group["params"] for group in self.param_groups))

    def _constrained(self, group: dict[str, Any]) -> list[torch.Tensor]:
        flags = {"stiefel": group.get("stiefel", self.stiefel_by_default)}
        return [param for param in group["params"] if is_constrained(param, flags)]

    def constrained_parameters(self) -> list[torch.Tensor]:
        return list(chain.from_iterable(self._constrained(g) for g in self.param_groups))

    def _check_group(self, group: dict[str, Any]) -> None:
        for param in self._constrained(group):
            if param.dim() < 2:
                raise ValueError(
                    f"parameter of shape {tuple(param.shape)} is constrained to the Stiefel "
                    "manifold but is not a (..., n, p) matrix; give its group `'stiefel': False`"
                )
            check_manifold_choices(param, self.retraction, "the RiemannianWrapper")

    # --- step ---------------------------------------------------------------------------
    def _check(self, params: list[torch.Tensor]) -> list[bool]:
        """One host sync: which gradients are finite, and the first-step orthonormality."""
        fresh = [param for param in params if id(param) not in self._checked]
        pieces = [param.grad.sum() for param in params]  # a NaN or inf entry propagates
        pieces += [orthogonality_error(oriented(p).to(working_dtype(p.dtype))).max() for p in fresh]
        device = params[0].device
        values = torch.stack([t.to(device, torch.float64) for t in pieces]).tolist()  # one sync
        finite = [abs(value) < float("inf") for value in values[: len(params)]]
        for param, error in zip(fresh, values[len(params) :], strict=True):
            tolerance = orthonormal_tolerance(param.dtype, frame_shape(param)[1])
            if not error <= tolerance:
                kind, fix = orientation_fix(param)
                description = f"Stiefel parameter of shape {tuple(param.shape)} ({param.dtype})"
                message = off_manifold_message(description, kind, fix, error, tolerance, True)
                raise ValueError(message)
        if self.nonfinite == "raise" and not all(finite):
            param = params[finite.index(False)]
            description = f"Stiefel parameter of shape {tuple(param.shape)} ({param.dtype})"
            raise ValueError(nonfinite_message(description))
        self._checked.update(id(param) for param in fresh)
        return finite

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Riemannian gradient in, inner Euclidean step, tangent projection, retraction."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with_grad = [param for param in self.constrained_parameters() if param.grad is not None]
        finite = self._check(with_grad) if with_grad else []
        hidden = [param for param, ok in zip(with_grad, finite, strict=True) if not ok]
        buckets: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        for param, ok in zip(with_grad, finite, strict=True):
            if ok:
                key = (frame_shape(param), param.dtype, param.device)
                buckets.setdefault(key, []).append(param)
        saved = []  # (params, old points, original grads, frame counts) per bucket
        for params in buckets.values():
            work = working_dtype(params[0].dtype)
            n, p = frame_shape(params[0])
            points = torch.cat([oriented(q).reshape(-1, n, p) for q in params]).to(work)
            grads = [q.grad for q in params]
            stacked = torch.cat([oriented(g).reshape(-1, n, p) for g in grads]).to(work)
            rgrad = project_tangent(points, stacked)  # (f, n, p)
            counts = [oriented(q)[..., 0, 0].numel() for q in params]
            for q, chunk in zip(params, rgrad.split(counts), strict=True):
                tall = chunk.view(oriented(q).shape).to(q.dtype)
                q.grad = tall if q.shape == tall.shape else tall.mT
            saved.append((params, points, grads, counts))
        hidden_grads = [param.grad for param in hidden]
        for param in hidden:  # the inner optimizer skips a parameter without a gradient
            param.grad = None
            self._skips[id(param)] = self._skips.get(id(param), 0) + 1
        try:
            self.optimizer.step()
        finally:
            for param, grad in zip(hidden, hidden_grads, strict=True):
                param.grad = grad
            for params, _, grads, _ in saved:
                for q, grad in zip(params, grads, strict=True):
                    q.grad = grad
        for params, points, _, counts in saved:
            n, p = points.shape[-2:]
            moved = torch.cat([oriented(q).reshape(-1, n, p) for q in params]).to(points.dtype)
            update = project_tangent(points, moved - points)  # (f, n, p)
            new = RETRACTIONS[self.retraction](points, update, **self.retraction_options)
            targets = [oriented(q) for q in params]
            sources = [c.view(t.shape) for c, t in zip(new.split(counts), targets, strict=True)]
            torch._foreach_copy_(targets, sources)
        return loss
