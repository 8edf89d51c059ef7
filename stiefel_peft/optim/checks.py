"""Validation shared by the Stiefel optimizers: options, parameters, tolerances, messages.

Every check raises ``ValueError`` naming the option or the parameter and the fix.
"""

from __future__ import annotations

import math
from typing import Any

import geoopt
import torch

from stiefel_peft.geometry import RETRACTIONS, Stiefel

UNSUPPORTED_FLAGS = ("fused", "capturable", "differentiable")
NONFINITE_POLICIES = ("skip", "raise")


def orthonormal_tolerance(dtype: torch.dtype, p: int) -> float:
    """First-step tolerance on ``||x^T x - I||_F``: ``16 eps(dtype) sqrt(p)``."""
    return 16.0 * torch.finfo(dtype).eps * math.sqrt(p)


def manifold_limit(dtype: torch.dtype, p: int) -> float:
    """The guard of every later step on ``||x^T x - I||_F``: ``1024 eps(dtype) sqrt(p)``.

    Far above the rounding drift a step can carry (the fused Cayley step corrects it every
    step), far below what a changed factor shows (about 7e-4 in float32 and 1.3e-12 in
    float64 at p = 32). A frame above it is not stepped and is reported at the next check.
    """
    return 1024.0 * torch.finfo(dtype).eps * math.sqrt(p)


def check_number(group: dict[str, Any], name: str, low: float, *, low_open: bool = False) -> None:
    """Raise unless ``group[name]`` is a finite real number ``>= low`` (``> low`` if open)."""
    value = group[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite real number, got {value!r}")
    if value < low or (low_open and value == low):
        relation = ">" if low_open else ">="
        raise ValueError(f"`{name}` must be {relation} {low}, got {value!r}")


def check_beta(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}")


def check_retraction_options(name: str, options: Any) -> None:
    if not isinstance(options, dict):
        raise ValueError(f"`retraction_options` must be a dict, got {type(options).__name__}")
    if options:
        x = torch.eye(2, 1, dtype=torch.float64)  # a tiny frame to try the options on
        try:
            RETRACTIONS[name](x, torch.zeros_like(x), **options)
        except TypeError as error:
            raise ValueError(
                f"`retraction_options` {options} are not accepted by retraction {name!r}: {error}"
            ) from None


def check_common(group: dict[str, Any]) -> None:
    """Checks shared by every Stiefel optimizer; raises ``ValueError`` naming the option."""
    check_number(group, "lr", 0.0)
    check_number(group, "weight_decay", 0.0)
    for flag in UNSUPPORTED_FLAGS:
        if group[flag]:
            raise ValueError(
                f"`{flag}=True` is not supported: the Stiefel step is already one batched "
                f"kernel sequence per bucket; pass `{flag}=False` (or leave it unset)"
            )
    if group["foreach"] not in (None, True, False):
        raise ValueError(f"`foreach` must be None, True or False, got {group['foreach']!r}")
    for flag in ("stiefel", "maximize"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"`{flag}` must be a bool, got {group[flag]!r}")
    every = group["check_every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(
            f"`check_every` must be an integer >= 1 (steps between two on-manifold "
            f"checks), got {every!r}"
        )
    if group["nonfinite"] not in NONFINITE_POLICIES:
        raise ValueError(
            f"`nonfinite` must be 'skip' (leave a factor whose gradient is not finite as it "
            f"was, and count it) or 'raise'; got {group['nonfinite']!r}"
        )
    name = group["retraction"]
    if not isinstance(name, str) or name not in RETRACTIONS:
        raise ValueError(
            f"`retraction` must name a registered retraction, one of {sorted(RETRACTIONS)}; got "
            f"{name!r} (add your own with `stiefel_peft.geometry.register_retraction`)"
        )
    check_retraction_options(name, group["retraction_options"])
    if group["stiefel"] and group["weight_decay"] != 0:
        raise ValueError(
            "`weight_decay` must be 0 in a Stiefel group (`stiefel=True`): on the manifold "
            "||x||_F^2 = p is constant, so decay has a zero Riemannian gradient, and a "
            "decoupled decay x <- (1 - lr wd) x would leave the manifold. Set weight_decay "
            "only in the Euclidean (`stiefel=False`) groups"
        )


def is_constrained(param: torch.Tensor, group: dict[str, Any]) -> bool:
    """Whether ``param`` is stepped on the manifold: a Stiefel ManifoldParameter or group flag.

    Raises ``ValueError`` for a ``geoopt.ManifoldParameter`` on another manifold.
    """
    if isinstance(param, geoopt.ManifoldParameter):
        if isinstance(param.manifold, Stiefel):
            return True
        raise ValueError(
            f"parameter of shape {tuple(param.shape)} is a geoopt.ManifoldParameter on "
            f"{type(param.manifold).__name__}; these optimizers only handle "
            "stiefel_peft.geometry.Stiefel (use geoopt's RiemannianAdam for other manifolds, "
            "or pass a plain torch.nn.Parameter)"
        )
    return bool(group["stiefel"])


def check_manifold_choices(param: torch.Tensor, retraction: str, where: str) -> None:
    """A Stiefel ``ManifoldParameter`` must agree with the optimizer: Euclidean metric and the
    retraction of its group (``where`` names it). Plain tensors pass.

    Raises:
        ValueError: naming both choices and how to make them agree.
    """
    if not isinstance(param, geoopt.ManifoldParameter):
        return
    manifold = param.manifold
    if manifold.metric != "euclidean":
        raise ValueError(
            f"the ManifoldParameter of shape {tuple(param.shape)} is on "
            f"Stiefel(metric={manifold.metric!r}); the Stiefel optimizers step with the "
            "Euclidean (embedded) metric. Use Stiefel(metric='euclidean'), or geoopt's "
            "RiemannianAdam for the canonical metric"
        )
    if manifold.retraction != retraction:
        raise ValueError(
            f"the ManifoldParameter of shape {tuple(param.shape)} is on "
            f"Stiefel(retraction={manifold.retraction!r}) but {where} uses "
            f"retraction={retraction!r}; make them agree (pass retraction="
            f"{manifold.retraction!r} to the optimizer or its param group, or build the "
            f"manifold with Stiefel(retraction={retraction!r}))"
        )


def check_stiefel_param(param: torch.Tensor, group: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless a constrained parameter is a real (..., n, p) matrix that
    agrees with its group (see :func:`check_manifold_choices`)."""
    if param.dim() < 2:
        raise ValueError(
            f"parameter of shape {tuple(param.shape)} is in a Stiefel group but has "
            f"{param.dim()} dimension(s); a Stiefel parameter is a (..., n, p) matrix (or a "
            "stack of them). Put it in a param group with `stiefel=False`"
        )
    if not param.is_floating_point():
        raise ValueError(
            f"Stiefel parameter of shape {tuple(param.shape)} has dtype {param.dtype}; it must "
            "be real floating point (float16/bfloat16/float32/float64)"
        )
    if min(param.shape[-2:]) == 0 or param.numel() == 0:
        raise ValueError(f"Stiefel parameter of shape {tuple(param.shape)} is empty")
    if isinstance(param, geoopt.ManifoldParameter) and group["weight_decay"] != 0:
        raise ValueError(
            f"the Stiefel ManifoldParameter of shape {tuple(param.shape)} is in a group with "
            f"weight_decay={group['weight_decay']}; decay is undefined on the manifold "
            "(||x||_F^2 = p), move it to a group with weight_decay=0"
        )
    check_manifold_choices(param, group["retraction"], "its param group")


def describe(param: torch.Tensor, group: dict[str, Any], group_index: int) -> str:
    """``'name' (shape, dtype) in param group k``: the name when the group carries
    ``param_names`` (``optimizer(model.named_parameters())``)."""
    names = group.get("param_names")
    label = ""
    if names:
        for candidate, name in zip(group["params"], names, strict=False):
            if candidate is param:
                label = f"{name!r} "
                break
    shape = tuple(param.shape)
    return f"Stiefel parameter {label}of shape {shape} ({param.dtype}) in param group {group_index}"


def orientation_fix(param: torch.Tensor) -> tuple[str, str]:
    """``("columns", "orthonormalize(w)")`` for a tall parameter, the rows form for a wide one."""
    if param.shape[-2] >= param.shape[-1]:
        return "columns", "orthonormalize(w)"
    return "rows", "orthonormalize(w.mT).mT"


def nonfinite_message(description: str, step: int | None = None) -> str:
    when = f" at step {step}" if step is not None else ""
    return (
        f"the gradient of the {description} is not finite (NaN or inf){when}; nothing "
        "was changed (nonfinite='raise'). Lower the learning rate, clip the gradients, use "
        "torch.amp.GradScaler for float16, or pass nonfinite='skip' to leave such a factor "
        "as it is and count the skip"
    )


def off_manifold_message(
    description: str, kind: str, fix: str, error: float, bound: float, first: bool
) -> str:
    if first:
        return (
            f"{description} does not have orthonormal {kind}: ||x^T x - I||_F = {error:.3g} > "
            f"{bound:.3g}. Put it on the manifold before the first step with "
            f"stiefel_peft.geometry.orthonormalize, e.g. `with torch.no_grad(): w.copy_({fix})`"
        )
    return (
        f"{description} has left the manifold: ||x^T x - I||_F = {error:.3g} > {bound:.3g} "
        "(was it changed outside the optimizer, by an edit or a load of other values?). The "
        f"optimizer left it as it was. Put it back with `with torch.no_grad(): w.copy_({fix})` "
        "(stiefel_peft.geometry.orthonormalize), or load a state saved from this optimizer"
    )
