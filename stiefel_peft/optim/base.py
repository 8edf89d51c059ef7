"""The shared machinery of the Stiefel optimizers: validation, classification, bucketed step.

Subclasses provide the hyperparameter checks, the Euclidean step (delegated to torch's own
functional optimizer, so Euclidean groups match torch exactly) and the bucket update (a pure
function from :mod:`stiefel_peft.optim.functional`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import geoopt
import torch

from stiefel_peft.geometry import RETRACTIONS, Stiefel, orthogonality_error, orthonormalize

from .buckets import Bucket, build_bucket, frame_shape, is_distributed_tensor

UNSUPPORTED_FLAGS = ("fused", "capturable", "differentiable")
COMMON_KEYS = (
    "lr", "retraction", "retraction_options", "stiefel", "drift_correction_every", "maximize",
    "foreach", "fused", "capturable", "differentiable", "weight_decay",
)  # fmt: skip


def orthonormal_tolerance(dtype: torch.dtype, p: int) -> float:
    """First-step tolerance on ``||x^T x - I||_F``: ``16 eps(dtype) sqrt(p)``."""
    return 16.0 * torch.finfo(dtype).eps * math.sqrt(p)


def check_number(group: dict[str, Any], name: str, low: float, *, low_open: bool = False) -> None:
    value = group[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"`{name}` must be a real number, got {value!r}")
    if value < low or (low_open and value == low):
        relation = ">" if low_open else ">="
        raise ValueError(f"`{name}` must be {relation} {low}, got {value!r}")


def check_beta(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}")


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
    every = group["drift_correction_every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(
            f"`drift_correction_every` must be an integer >= 1 (steps between two Newton-Schulz "
            f"corrections), got {every!r}"
        )
    name = group["retraction"]
    if not isinstance(name, str) or name not in RETRACTIONS:
        raise ValueError(
            f"`retraction` must name a registered retraction, one of {sorted(RETRACTIONS)}; got "
            f"{name!r} (add your own with `stiefel_peft.geometry.register_retraction`)"
        )
    options = group["retraction_options"]
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


def check_stiefel_param(param: torch.Tensor, group: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless a constrained parameter is a real (..., n, p) matrix."""
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


class StiefelOptimizer(torch.optim.Optimizer):
    """Base class: Euclidean groups go to torch's functional step, Stiefel ones to buckets."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._buckets: list[Bucket] | None = None
        self._euclidean: list[list[torch.Tensor]] = []
        super().__init__(params, defaults)

    # --- hooks ------------------------------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> None:
        """Subclass hyperparameter checks (``group`` has every key)."""
        raise NotImplementedError

    def _state_spec(self, group: dict[str, Any]) -> dict[str, str]:
        raise NotImplementedError

    def _euclidean_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def _update_bucket(
        self,
        x: torch.Tensor,
        grad: torch.Tensor,
        state: dict[str, torch.Tensor],
        group: dict[str, Any],
        step: int,
        correct_drift: bool,
    ) -> torch.Tensor:
        raise NotImplementedError

    def _check_distributed(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        """Reject a DTensor Stiefel parameter: the bucket math here assumes whole frames.

        A shard-aware subclass (:mod:`stiefel_peft.distributed`) overrides this and
        :meth:`_bucket_key`.
        """
        if is_distributed_tensor(param):
            raise ValueError(
                f"Stiefel parameter of shape {tuple(param.shape)} is a DTensor (FSDP2 / "
                f"tensor parallel); {type(self).__name__} steps whole frames only. Use "
                "stiefel_peft.distributed.ShardedStiefelAdam (fora_optimizer picks it for "
                "sharded models)"
            )

    def _bucket_key(self, param: torch.Tensor) -> tuple[Any, ...]:
        """Parameters with equal keys (in one group) are stacked into one bucket."""
        return (frame_shape(param), param.dtype, param.device)

    # --- groups -----------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        allowed = set(self.defaults) | {"params", "param_names"}
        unknown = sorted(set(param_group) - allowed)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} in a param group of {type(self).__name__}; "
                f"known options: {sorted(set(self.defaults))}"
            )
        merged = {**self.defaults, **param_group}
        check_common(merged)
        self._check_group(merged)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for param in group["params"]:
                if is_constrained(param, group):
                    check_stiefel_param(param, group)
                    self._check_distributed(param, group)
        except ValueError:
            self.param_groups.pop()
            raise
        self._buckets = None

    def _build(self) -> list[Bucket]:
        buckets, self._euclidean = [], []
        for index, group in enumerate(self.param_groups):
            keyed: dict[tuple[Any, ...], list[torch.Tensor]] = {}
            euclidean = []
            for param in group["params"]:
                if is_constrained(param, group):
                    # again here: a wrapper (accelerate's FSDP2 prepare) may have swapped the
                    # parameters for DTensors after construction
                    self._check_distributed(param, group)
                    key = self._bucket_key(param)
                    keyed.setdefault(key, []).append(param)
                else:
                    euclidean.append(param)
            self._euclidean.append(euclidean)
            spec = self._state_spec(group)
            buckets.extend(build_bucket(index, ps, self.state, spec) for ps in keyed.values())
        return buckets

    # --- step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step for every parameter with a gradient (``p.grad`` is read, never changed)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._buckets is None:
            self._buckets = self._build()
        for group, euclidean in zip(self.param_groups, self._euclidean, strict=True):
            with_grad = [param for param in euclidean if param.grad is not None]
            if with_grad:
                self._euclidean_step(group, with_grad)
        for bucket in self._buckets:
            self._step_bucket(bucket, self.param_groups[bucket.group_index])
        return loss

    def _step_bucket(self, bucket: Bucket, group: dict[str, Any]) -> None:
        active = [i for i, param in enumerate(bucket.params) if param.grad is not None]
        if not active:
            return
        counts = {bucket.steps_host[i] for i in active}
        if len(active) == len(bucket.params) and len(counts) == 1:
            self._step_positions(bucket, group, None, counts.pop() + 1)
            return
        # rare path: some gradients are None, or the parameters have different step counts
        by_count: dict[int, list[int]] = {}
        for i in active:
            by_count.setdefault(bucket.steps_host[i], []).append(i)
        for count, positions in by_count.items():
            self._step_positions(bucket, group, positions, count + 1)

    def _step_positions(
        self, bucket: Bucket, group: dict[str, Any], positions: list[int] | None, step: int
    ) -> None:
        index = None if positions is None else bucket.frame_index(positions)
        if bucket.params[0].grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if step == 1:
            self._first_step(bucket, group, positions, index)
        x = bucket.points(positions, index)
        grad = bucket.stack_grads(positions)
        state = bucket.gather_state(index)
        correct = step % group["drift_correction_every"] == 0
        new = self._update_bucket(x, grad, state, group, step, correct)
        bucket.scatter_state(index, state)
        bucket.write_points(positions, index, new)
        bucket.advance(positions)

    def _first_step(
        self,
        bucket: Bucket,
        group: dict[str, Any],
        positions: list[int] | None,
        index: torch.Tensor | None,
    ) -> None:
        """Check orthonormality (one host sync) and fill the float32 master copies."""
        chosen = list(range(len(bucket.params))) if positions is None else positions
        stacked = bucket.stack_params(positions)  # (f, n, p), parameter dtype
        errors = self._orthogonality_errors(stacked, bucket)  # (f,)
        tolerance = orthonormal_tolerance(bucket.dtype, bucket.shape[1])
        per_param = errors.split([bucket.frames[i] for i in chosen])
        worst = torch.stack([e.max() for e in per_param]).tolist()  # the one sync
        for i, error in zip(chosen, worst, strict=True):
            if not error <= tolerance:
                raise ValueError(
                    self._not_orthonormal_message(bucket.params[i], bucket, error, tolerance)
                )
        if bucket.master is not None:
            # the master is the polar factor of the rounded parameter: orthonormal in float32
            exact = self._orthonormalized(stacked.to(torch.float32))
            if index is None:
                bucket.master.copy_(exact)
            else:
                bucket.master.index_copy_(0, index, exact)

    def _orthogonality_errors(self, stacked: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        """``||x^T x - I||_F`` per frame of ``(f, n, p)``: ``(f,)``. A shard-aware subclass
        reduces the p x p Gram across ranks."""
        return orthogonality_error(stacked)

    def _orthonormalized(self, stacked: torch.Tensor) -> torch.Tensor:
        """The polar factor of each frame of ``(f, n, p)`` (the nearest orthonormal frame)."""
        return orthonormalize(stacked)

    def _not_orthonormal_message(
        self, param: torch.Tensor, bucket: Bucket, error: float, tolerance: float
    ) -> str:
        kind = "columns" if param.shape[-2] >= param.shape[-1] else "rows"
        fix = "orthonormalize(w)" if kind == "columns" else "orthonormalize(w.mT).mT"
        return (
            f"Stiefel parameter of shape {tuple(param.shape)} ({param.dtype}) in param "
            f"group {bucket.group_index} does not have orthonormal {kind}: "
            f"||x^T x - I||_F = {error:.3g} > {tolerance:.3g}. Put it on the manifold "
            f"before the first step with stiefel_peft.geometry.orthonormalize, e.g. "
            f"`with torch.no_grad(): w.copy_({fix})`"
        )

    # --- state ------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, but keep Stiefel state in its saved (working) dtype.

        torch casts floating state to the parameter dtype, which would round the float32
        master copies and moments of a bf16 parameter; they are restored here, and the buckets
        are re-stacked at the next step.
        """
        saved_state = state_dict["state"]
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        super().load_state_dict(state_dict)
        params = chain.from_iterable(((p, g) for p in g["params"]) for g in self.param_groups)
        for saved_id, (param, group) in zip(saved_ids, params, strict=True):
            if saved_id in saved_state and is_constrained(param, group):
                for key, value in saved_state[saved_id].items():
                    if isinstance(value, torch.Tensor) and key != "step":
                        self.state[param][key] = value.to(device=param.device, copy=True)
        self._buckets = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._buckets = None

