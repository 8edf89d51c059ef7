"""StiefelSGD: Riemannian SGD with momentum on Stiefel parameters, exact SGD on the rest."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.sgd import sgd as torch_sgd  # torch.optim deletes its submodule names

from .base import StiefelOptimizer
from .buckets import FRAME
from .checks import check_number
from .functional import Reduce, StepOutcome, stiefel_sgd_update

__all__ = ["StiefelSGD"]


class StiefelSGD(StiefelOptimizer):
    r"""SGD (heavy-ball or Nesterov) on the Stiefel manifold, ``torch.optim.SGD`` elsewhere.

    Constrained parameters, shapes, dtypes and errors follow :class:`StiefelAdam`. The Stiefel
    step (``docs/optim.md``):

    .. math::
        r = P_x(g),\quad b \leftarrow \mu b + (1-\tau) r\ (b_1 = r),\quad
        d = r + \mu b\ \text{(Nesterov)}\ \text{or}\ b,\quad y = R_x(-\eta d),\quad
        b \leftarrow P_y(b)

    Groups with ``stiefel=False`` call torch's functional SGD, so they equal
    ``torch.optim.SGD`` with the same options.

    Args:
        params: parameters or param groups (a group may override every option).
        lr: learning rate (>= 0).
        momentum: ``mu`` >= 0.
        dampening: ``tau`` >= 0.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: L2 decay for Euclidean groups; must be 0 in a Stiefel group.
        retraction: as for :class:`StiefelAdam`.
        retraction_options: as for :class:`StiefelAdam`.
        stiefel: as for :class:`StiefelAdam`.
        check_every: as for :class:`StiefelAdam`.
        nonfinite: as for :class:`StiefelAdam`.
        maximize: as for :class:`StiefelAdam`.
        foreach: passed to torch's SGD for Euclidean groups.
        fused: not supported; True raises ``ValueError``.
        capturable: not supported; True raises ``ValueError``.
        differentiable: not supported; True raises ``ValueError``.

    Raises:
        ValueError: as :class:`StiefelAdam`, and for Nesterov without momentum.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        retraction: str = "cayley",
        *,
        retraction_options: dict[str, Any] | None = None,
        stiefel: bool = True,
        check_every: int = 100,
        nonfinite: str = "skip",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "retraction": retraction,
            "retraction_options": dict(retraction_options or {}),
            "stiefel": stiefel,
            "check_every": check_every,
            "nonfinite": nonfinite,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "capturable": capturable,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_number(group, "momentum", 0.0)
        check_number(group, "dampening", 0.0)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"`nesterov` must be a bool, got {group['nesterov']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("`nesterov=True` requires `momentum > 0` and `dampening == 0`")

    def _state_spec(self, group: dict[str, Any]) -> dict[str, str]:
        return {"momentum_buffer": FRAME} if group["momentum"] != 0 else {}

    def _euclidean_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        grads = [param.grad for param in params]
        buffers = [self.state[param].get("momentum_buffer") for param in params]
        torch_sgd(
            params,
            grads,
            buffers,
            has_sparse_grad=any(grad.is_sparse for grad in grads),
            foreach=group["foreach"],
            fused=None,
            grad_scale=None,
            found_inf=None,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if group["momentum"] != 0:
            for param, buffer in zip(params, buffers, strict=True):
                self.state[param]["momentum_buffer"] = buffer

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
        if reduce is not None:
            raise ValueError("StiefelSGD steps whole frames only (no sharded form)")
        return stiefel_sgd_update(
            x,
            grad,
            state.get("momentum_buffer"),
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            first_step=step == 1,
            retraction=group["retraction"],
            retraction_options=group["retraction_options"],
            maximize=group["maximize"],
            limit=limit,
            out=out,
        )
