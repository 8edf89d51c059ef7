"""StiefelAdam: Riemannian Adam on Stiefel parameters, exact AdamW on the rest."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adam import adam as torch_adam  # torch.optim deletes its submodule names

from .base import StiefelOptimizer
from .buckets import FRAME, SCALAR, SQUARE, is_distributed_tensor
from .checks import check_beta, check_number
from .distance import DistanceState, distance_adam_step
from .functional import SECOND_MOMENTS, Reduce, StepOutcome, stiefel_adam_update

__all__ = ["StiefelAdam"]


def _scalar_dtype() -> torch.dtype:
    # torch.optim keeps `step` in float32 (float64 when that is the default dtype)
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class StiefelAdam(StiefelOptimizer):
    r"""Adam on the Stiefel manifold for constrained parameters, AdamW for the others.

    Which parameters are constrained: those in param groups with ``stiefel=True`` (the
    default) and every ``geoopt.ManifoldParameter`` on :class:`stiefel_peft.geometry.Stiefel`
    whatever its group says. A tall ``(n, p)`` matrix keeps orthonormal columns, a wide one
    orthonormal rows (it is handled as its transpose); a ``(..., n, p)`` tensor is a stack of
    independent frames. Groups with ``stiefel=False`` are stepped by torch's own AdamW code
    (decoupled weight decay), so they match ``torch.optim.AdamW`` exactly.

    Stiefel step (``docs/optim.md``): Euclidean-metric Riemannian gradient, first moment,
    second moment (one scalar ``||r||_F^2`` per matrix, or per element with a tangent
    projection of the preconditioned direction), bias correction, the named retraction,
    projection transport of the first moment, and one Newton-Schulz drift correction (folded
    into the fused Cayley step). Same-shape frames are stacked and stepped as one batch;
    half-precision parameters are stepped on a float32 master copy held in the state.

    Args:
        params: parameters or param groups; a group may override every option below.
        lr: learning rate. With ``second_moment="matrix"`` it is (about) the Frobenius norm of
            each matrix's step, as in geoopt and the FoRA / Cayley-Adam papers; with
            ``"element"`` it is (about) the step of each entry, as in Adam.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to the root of the second moment, >= 0.
        weight_decay: decoupled decay (AdamW) for Euclidean groups; must be 0 in a Stiefel
            group (on the manifold ``||x||_F^2 = p`` is constant, so decay has no meaning).
        retraction: a name in :data:`stiefel_peft.geometry.RETRACTIONS` (default ``"cayley"``).
        retraction_options: keyword options passed to the retraction (e.g. ``{"steps": 8}``).
        second_moment: ``"matrix"`` (default) or ``"element"``.
        stiefel: default for groups that do not say (True).
        check_every: steps between two on-manifold checks of each parameter (one host sync
            per check, default 100). Between checks a frame found off the manifold is left
            as it is; the check raises ``ValueError`` naming it.
        nonfinite: ``"skip"`` (default): a factor whose gradient holds a NaN or inf is left
            exactly as it was, point and moments, and counted in
            ``state[param]["nonfinite_skips"]`` (no host sync); ``"raise"``: ``ValueError``
            before anything is changed (one host sync per step). See ``docs/optim.md``.
        distance_estimate: Euclidean groups only (True in a Stiefel group raises): replace the
            group's rate by Prodigy's running estimate ``d`` of the distance to a solution
            (:mod:`stiefel_peft.optim.distance`); ``lr`` is then a multiplier of ``d`` (1.0 is
            the method's own value; a schedule scales it as usual). The current ``d`` is
            ``group["distance"]``, saved with the state. Off by default: such groups match
            ``torch.optim.AdamW`` exactly.
        initial_distance: the starting ``d`` of a ``distance_estimate`` group, > 0 (1e-6).
        maximize: ascend instead of descend.
        foreach: passed to torch's AdamW for Euclidean groups.
        fused: not supported; True raises ``ValueError``.
        capturable: not supported; True raises ``ValueError``.
        differentiable: not supported; True raises ``ValueError``.

    Raises:
        ValueError: on a bad hyperparameter (named), an unknown group option, a 1-D or
            non-floating parameter in a Stiefel group, a ManifoldParameter on another manifold
            or with another metric or retraction than its group, a Stiefel parameter that is
            not orthonormal at its first step or has left the manifold at a later check, or
            (``nonfinite="raise"``) a non-finite gradient.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        retraction: str = "cayley",
        *,
        retraction_options: dict[str, Any] | None = None,
        second_moment: str = "matrix",
        stiefel: bool = True,
        check_every: int = 100,
        nonfinite: str = "skip",
        distance_estimate: bool = False,
        initial_distance: float = 1e-6,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "retraction": retraction,
            "retraction_options": dict(retraction_options or {}),
            "second_moment": second_moment,
            "stiefel": stiefel,
            "check_every": check_every,
            "nonfinite": nonfinite,
            "distance_estimate": distance_estimate,
            "initial_distance": initial_distance,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "capturable": capturable,
            "differentiable": differentiable,
            "amsgrad": False,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_number(group, "eps", 0.0)
        if group["stiefel"] and group["eps"] == 0:
            raise ValueError(
                "`eps` must be > 0 in a Stiefel group: a factor whose Riemannian gradient is "
                "exactly zero (lora_B at the first step, while lora_A is zero) would get 0/0. "
                "Keep the default 1e-8"
            )
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"`betas` must be a pair (beta1, beta2), got {betas!r}")
        check_beta(betas[0], "betas[0]")
        check_beta(betas[1], "betas[1]")
        if group["second_moment"] not in SECOND_MOMENTS:
            raise ValueError(
                f"`second_moment` must be one of {SECOND_MOMENTS}, got {group['second_moment']!r}"
            )
        if not isinstance(group["distance_estimate"], bool):
            raise ValueError(
                f"`distance_estimate` must be a bool, got {group['distance_estimate']!r}"
            )
        if group["distance_estimate"] and group["stiefel"]:
            raise ValueError(
                "`distance_estimate=True` is for Euclidean groups (`stiefel=False`): the Stiefel "
                "step's rate is a distance on the manifold already. Set it only in the groups of "
                "free parameters"
            )
        check_number(group, "initial_distance", 0.0, low_open=True)
        if group["amsgrad"]:
            raise ValueError("`amsgrad=True` is not supported by StiefelAdam")

    def _state_spec(self, group: dict[str, Any]) -> dict[str, str]:
        second = SCALAR if group["second_moment"] == "matrix" else FRAME
        # exp_avg is stored before its transport to the current point; exp_avg_transport holds
        # the p x p product that the next step applies (see functional.stiefel_adam_update)
        return {"exp_avg": FRAME, "exp_avg_sq": second, "exp_avg_transport": SQUARE}

    def _euclidean_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if group["distance_estimate"]:
            self._distance_step(group, params)
            return
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for param in params:
            if param.grad.is_sparse:
                raise RuntimeError("StiefelAdam does not support sparse gradients")
            state = self.state[param]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            grads.append(param.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        torch_adam(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=group["foreach"],
            capturable=False,
            differentiable=False,
            fused=None,
            grad_scale=None,
            found_inf=None,
            has_complex=any(torch.is_complex(param) for param in params),
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )

    def _distance_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """The Euclidean step of a ``distance_estimate`` group (one host sync)."""
        state_lists: dict[str, list[torch.Tensor]] = {
            "exp_avg": [], "exp_avg_sq": [], "initial": [], "gradient_sum": []
        }  # fmt: skip
        for param in params:
            if param.grad.is_sparse:
                raise RuntimeError("StiefelAdam does not support sparse gradients")
            if is_distributed_tensor(param):
                raise ValueError(
                    f"parameter of shape {tuple(param.shape)} is a DTensor: `distance_estimate` "
                    "sums over whole parameters and does not support sharded ones yet; set "
                    "`distance_estimate=False` for this group"
                )
            state = self.state[param]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                for key in ("exp_avg", "exp_avg_sq", "gradient_sum"):
                    state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["initial"] = param.detach().clone()
            for key, values in state_lists.items():
                values.append(state[key])
        steps = {int(self.state[param]["step"]) for param in params}
        if len(steps) != 1:
            raise ValueError(
                "every parameter of a `distance_estimate` group must have taken the same "
                f"number of steps (found {sorted(steps)}): they share one estimate. Put "
                "parameters that join later in a group of their own"
            )
        for param in params:
            self.state[param]["step"] += 1
        estimate = DistanceState(
            group.get("distance", group["initial_distance"]), group.get("distance_numerator", 0.0)
        )
        beta1, beta2 = group["betas"]
        distance_adam_step(
            params,
            [param.grad for param in params],
            state_lists["exp_avg"],
            state_lists["exp_avg_sq"],
            state_lists["initial"],
            state_lists["gradient_sum"],
            estimate,
            step=steps.pop() + 1,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
        )
        group["distance"], group["distance_numerator"] = estimate.distance, estimate.numerator

    def _update_bucket(
        self,
        x: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, torch.Tensor],
        group: dict[str, Any],
        step: int,
        limit: float,
        reduce: Reduce | None,
        out: torch.Tensor | None,
    ) -> StepOutcome:
        beta1, beta2 = group["betas"]
        return stiefel_adam_update(
            x,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["exp_avg_transport"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            step=step,
            second_moment=group["second_moment"],
            retraction=group["retraction"],
            retraction_options=group["retraction_options"],
            maximize=group["maximize"],
            limit=limit,
            reduce=reduce,
            out=out,
        )
