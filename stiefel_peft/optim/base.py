"""The shared machinery of the Stiefel optimizers: groups, buckets, checks, the bucketed step.

Subclasses provide the hyperparameter checks, the Euclidean step (delegated to torch's own
functional optimizer, so Euclidean groups match torch exactly) and the bucket update (a pure
function from :mod:`stiefel_peft.optim.functional`). A shard-aware subclass
(:mod:`stiefel_peft.distributed`) only adds placement checks and a reduction per bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from .buckets import SCALAR, Bucket, build_bucket, frame_shape, is_distributed_tensor
from .checks import (
    check_common,
    check_stiefel_param,
    describe,
    is_constrained,
    manifold_limit,
    nonfinite_message,
    off_manifold_message,
    orientation_fix,
    orthonormal_tolerance,
)
from .functional import Reduce, StepOutcome, orthogonality_errors, orthonormalized, reduced_products

SKIPS = "nonfinite_skips"  # per-frame count of steps skipped for a non-finite gradient
Check = tuple[torch.Tensor, Callable[[list[float]], Callable[[], None] | None]]


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
        limit: float,
        reduce: Reduce | None,
        out: torch.Tensor | None,
    ) -> StepOutcome:
        raise NotImplementedError

    def _check_distributed(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        """Reject a DTensor Stiefel parameter: the bucket math here assumes whole frames.

        A shard-aware subclass (:mod:`stiefel_peft.distributed`) overrides this,
        :meth:`_bucket_key` and :meth:`_frame_reduce`.
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

    def _frame_reduce(self, param: torch.Tensor) -> Reduce | None:
        """The reduction over the processes that hold other rows of ``param``'s frames."""
        return None

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
                    # parameters for DTensors, or the group's options changed, since then
                    check_stiefel_param(param, group)
                    self._check_distributed(param, group)
                    keyed.setdefault(self._bucket_key(param), []).append(param)
                else:
                    euclidean.append(param)
            self._euclidean.append(euclidean)
            spec = {**self._state_spec(group), SKIPS: SCALAR}
            for params in keyed.values():
                bucket = build_bucket(index, params, self.state, spec)
                bucket.reduce = self._frame_reduce(params[0])
                buckets.append(bucket)
        return buckets

    # --- step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step for every parameter with a gradient (``p.grad`` is read, never changed).

        Host-synchronising checks run first, before anything is changed: the on-manifold
        check at a parameter's first step and every ``check_every`` steps, and the
        gradient check of ``nonfinite="raise"`` groups (one sync per device for all of them).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._buckets is None:
            self._buckets = self._build()
        work = []
        for bucket in self._buckets:
            active = [i for i, param in enumerate(bucket.params) if param.grad is not None]
            if active:
                work.append((bucket, self.param_groups[bucket.group_index], active))
        self._preflight(work)
        for group, euclidean in zip(self.param_groups, self._euclidean, strict=True):
            with_grad = [param for param in euclidean if param.grad is not None]
            if with_grad:
                self._euclidean_step(group, with_grad)
        for bucket, group, active in work:
            self._step_bucket(bucket, group, active)
        return loss

    def nonfinite_skips(self) -> int:
        """Steps skipped for a non-finite gradient, summed over every Stiefel frame (one sync).

        Per parameter: ``optimizer.state[param]["nonfinite_skips"]`` (one count per frame).
        """
        counts = [bucket.state[SKIPS].sum() for bucket in self._buckets or []]
        return int(sum(float(count) for count in counts))

    def _step_bucket(self, bucket: Bucket, group: dict[str, Any], active: list[int]) -> None:
        sparse = [bucket.params[i] for i in active if bucket.params[i].grad.is_sparse]
        if sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
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
        x = bucket.points(positions, index)
        grad = bucket.stack_grads(positions)  # a copy in the working dtype: scratch space
        state = bucket.gather_state(index)
        limit = manifold_limit(bucket.working_dtype, bucket.shape[1])
        out = bucket.scratch() if positions is None else None
        outcome = self._update_bucket(x, grad, state, group, step, limit, bucket.reduce, out)
        state[SKIPS].add_(outcome.skipped.view(-1, 1, 1).to(state[SKIPS].dtype))
        bucket.scatter_state(index, state)
        bucket.write_points(positions, index, outcome.point)
        bucket.advance(positions)

    # --- checks that synchronise with the host ---------------------------------------
    def _preflight(self, work: list[tuple[Bucket, dict[str, Any], list[int]]]) -> None:
        """Run the due checks with one host sync per device; raise before changing anything."""
        checks: list[Check] = []
        for bucket, group, active in work:
            every = group["check_every"]
            due = [i for i in active if (bucket.steps_host[i] + 1) % every == 0]
            due = sorted({*due, *(i for i in active if bucket.steps_host[i] == 0)})
            if due:
                checks.append(self._manifold_check(bucket, group, due))
            if group["nonfinite"] == "raise":
                checks.append(self._finite_check(bucket, group, active))
        by_device: dict[torch.device, list[Check]] = {}
        for check in checks:
            by_device.setdefault(check[0].device, []).append(check)
        updates = []
        for entries in by_device.values():
            flat = torch.cat([values.reshape(-1).to(torch.float64) for values, _ in entries])
            numbers = flat.tolist()  # the one host sync of this device
            offset = 0
            for values, handle in entries:
                update = handle(numbers[offset : offset + values.numel()])
                offset += values.numel()
                if update is not None:
                    updates.append(update)
        for update in updates:  # every check passed: now the float32 masters may be refilled
            update()

    def _manifold_check(self, bucket: Bucket, group: dict[str, Any], due: list[int]) -> Check:
        """On-manifold check of the parameters at ``due`` (first step, or a periodic check).

        Float32/64 parameters are checked as they are. A half-precision parameter is checked
        in its own precision when it is new or was changed outside the optimizer (it then
        differs from its rounded float32 master), and its master is refilled from it; else
        its master is checked.
        """
        index = bucket.frame_index(due)
        stacked = bucket.stack_params(due)  # (k, n, p) in the parameter dtype
        work_dtype, p = bucket.working_dtype, bucket.shape[1]
        errors = orthogonality_errors(stacked.to(work_dtype), bucket.reduce)  # (k,)
        pieces = [errors]
        if bucket.master is not None:
            master = bucket.master.index_select(0, index)
            changed = (stacked != master.to(stacked.dtype)).flatten(1).any(1).to(work_dtype)
            (changed,) = reduced_products([], bucket.reduce, sums=[changed[:, None, None]])
            pieces += [changed.view(-1), orthogonality_errors(master, bucket.reduce)]
        frames = [bucket.frames[i] for i in due]

        def handle(numbers: list[float]) -> Callable[[], None] | None:
            count = len(numbers) // len(pieces)
            per_piece = [numbers[k * count : (k + 1) * count] for k in range(len(pieces))]
            refill, offset = [], 0
            for i, size in zip(due, frames, strict=True):
                param, first = bucket.params[i], bucket.steps_host[i] == 0
                param_error = max(per_piece[0][offset : offset + size])
                if bucket.master is None:
                    error = param_error
                    bound = (orthonormal_tolerance if first else manifold_limit)(work_dtype, p)
                elif first or max(per_piece[1][offset : offset + size]) > 0:
                    error, bound = param_error, orthonormal_tolerance(param.dtype, p)
                    refill.extend(range(offset, offset + size))
                else:
                    error = max(per_piece[2][offset : offset + size])
                    bound = manifold_limit(work_dtype, p)
                offset += size
                if not error <= bound:
                    kind, fix = orientation_fix(param)
                    description = describe(param, group, bucket.group_index)
                    message = off_manifold_message(description, kind, fix, error, bound, first)
                    raise ValueError(message)
            if not refill:
                return None

            def update() -> None:
                # the master is the polar factor of the rounded parameter: orthonormal in float32
                chosen = torch.tensor(refill, device=stacked.device)
                chosen_frames = stacked.index_select(0, chosen).to(work_dtype)
                exact = orthonormalized(chosen_frames, bucket.reduce)
                bucket.master.index_copy_(0, index.index_select(0, chosen), exact)

            return update

        return torch.cat(pieces), handle

    def _finite_check(self, bucket: Bucket, group: dict[str, Any], active: list[int]) -> Check:
        """``nonfinite="raise"``: every gradient of ``active`` must be finite (sum per frame)."""
        positions = None if len(active) == len(bucket.params) else active
        (sums,) = reduced_products([], bucket.reduce, sums=[bucket.stack_grads(positions)])
        frames = [bucket.frames[i] for i in active]

        def handle(numbers: list[float]) -> None:
            offset = 0
            for i, size in zip(active, frames, strict=True):
                values = numbers[offset : offset + size]
                offset += size
                if not all(abs(value) < float("inf") for value in values):  # NaN fails too
                    param = bucket.params[i]
                    description = describe(param, group, bucket.group_index)
                    raise ValueError(nonfinite_message(description, bucket.steps_host[i] + 1))

        return sums.view(-1), handle

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
