"""ShardedStiefelAdam: StiefelAdam on DTensor (FSDP2) factors sharded along their long dimension.

Plain-tensor parameters (and every Euclidean group) are stepped exactly as by
:class:`~stiefel_peft.optim.StiefelAdam`. A Stiefel parameter that is a
``torch.distributed.tensor.DTensor`` is stepped on its local rows by the same functional step
(:func:`~stiefel_peft.optim.functional.stiefel_adam_update`) with a reduction: p x p
all-reduces over the mesh dimensions that shard it, never a gather. This module only adds the
placement checks and that reduction. See ``docs/distributed.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from stiefel_peft.optim import StiefelAdam
from stiefel_peft.optim.buckets import frame_shape, oriented_local
from stiefel_peft.optim.checks import is_constrained
from stiefel_peft.optim.functional import Reduce, uses_fused_cayley

__all__ = ["ShardedStiefelAdam", "frame_all_reduce", "stiefel_shard_placement"]


def _long_dimension(param: torch.Tensor) -> int:
    """Index of the long (``n``) dimension: ``-2`` for a tall parameter, ``-1`` for a wide one."""
    return param.dim() - 2 if param.shape[-2] >= param.shape[-1] else param.dim() - 1


def _shard_mesh_dims(param: DTensor) -> list[int]:
    """Mesh dimensions that shard ``param`` along its long dimension.

    Raises:
        ValueError: for any other placement (sharded along the short dimension or a stack
            dimension, partial sums, strided shards).
    """
    long_dim = _long_dimension(param)
    kind = "wide" if long_dim == param.dim() - 1 else "tall"
    dims = []
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is Shard and placement.dim % param.dim() == long_dim:
            dims.append(mesh_dim)
            continue
        raise ValueError(
            f"Stiefel DTensor parameter of shape {tuple(param.shape)} ({kind}) has placements "
            f"{tuple(param.placements)}; the sharded Stiefel step needs it sharded along its "
            f"long dimension (Shard({long_dim})) or replicated. For a wide factor such as "
            "FoRA's lora_A (r x d_in) pass "
            "`fully_shard(module, shard_placement_fn=stiefel_shard_placement(params))`"
        )
    return dims


def frame_all_reduce(param: torch.Tensor) -> Reduce | None:
    """The in-place SUM over the processes that share ``param``'s frames; None if not a DTensor.

    Sums over the process group of every mesh dimension that shards the long dimension (one
    after the other on a multi-dimensional mesh); the identity for a replicated DTensor.

    Raises:
        ValueError: as :func:`_shard_mesh_dims`.
    """
    if not isinstance(param, DTensor):
        return None
    groups = [param.device_mesh.get_group(mesh_dim) for mesh_dim in _shard_mesh_dims(param)]

    def all_reduce(tensor: torch.Tensor) -> None:
        for group in groups:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)

    return all_reduce


def stiefel_shard_placement(
    parameters: Iterable[torch.Tensor],
) -> Callable[[nn.Parameter], Shard | None]:
    """A ``shard_placement_fn`` for ``fully_shard`` that shards Stiefel factors along ``n``.

    Returns ``Shard(last dim)`` for the wide parameters among ``parameters`` (FoRA's
    ``lora_A`` when ``stiefel_factor="A"``) and None (FSDP's default ``Shard(0)``) for the
    rest, tall factors included.
    """
    wide = {
        id(param) for param in parameters if param.dim() >= 2 and param.shape[-2] < param.shape[-1]
    }

    def placement(param: nn.Parameter) -> Shard | None:
        return Shard(param.dim() - 1) if id(param) in wide else None

    return placement


class ShardedStiefelAdam(StiefelAdam):
    r""":class:`~stiefel_peft.optim.StiefelAdam` that also steps DTensor Stiefel parameters.

    Same arguments, state layout, equations and checks as ``StiefelAdam``. A Stiefel
    parameter that is a DTensor must be sharded along its long dimension (``Shard(0)`` for a
    tall ``(n, p)`` factor such as FoRA's ``lora_B`` under FSDP2's default placement,
    ``Shard(1)`` for a wide one, see :func:`stiefel_shard_placement`) or replicated, on any
    mesh dimensions. Its step runs on the local rows with one all-reduce of p x p products
    per phase; its optimizer state holds plain tensors of the local rows (a per-matrix second
    moment is replicated).

    Every process must call ``step()`` with the same parameters having gradients (as FSDP
    guarantees), since the collectives are issued per bucket.

    Raises:
        ValueError: as ``StiefelAdam``; for a DTensor Stiefel parameter with another placement
            (named, with the fix), a gradient placed unlike its parameter, or in a group whose
            ``retraction`` is not the package's ``"cayley"`` (the only retraction with a
            sharded form here).
    """

    def _check_distributed(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        if not isinstance(param, DTensor):
            return
        _shard_mesh_dims(param)
        _check_retraction(group, param)
        grad = param.grad
        if grad is not None and tuple(grad.placements) != tuple(param.placements):
            raise ValueError(
                f"the gradient of the DTensor parameter of shape {tuple(param.shape)} has "
                f"placements {tuple(grad.placements)}, the parameter {tuple(param.placements)}; "
                "they must match"
            )

    def _bucket_key(self, param: torch.Tensor) -> tuple[Any, ...]:
        if not isinstance(param, DTensor):
            return super()._bucket_key(param)
        local_shape = tuple(oriented_local(param).shape[-2:])
        return (frame_shape(param), local_shape, param.dtype, param.device,
                param.device_mesh, tuple(param.placements))  # fmt: skip

    def _frame_reduce(self, param: torch.Tensor) -> Reduce | None:
        return frame_all_reduce(param)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """As ``StiefelAdam.step``; first re-checks the placements of DTensor factors and
        their gradients (host-side only)."""
        for group in self.param_groups:
            for param in group["params"]:
                if isinstance(param, DTensor) and is_constrained(param, group):
                    self._check_distributed(param, group)
        return super().step(closure)


def _check_retraction(group: dict[str, Any], param: torch.Tensor) -> None:
    if not uses_fused_cayley(group["retraction"]):
        raise ValueError(
            f"DTensor Stiefel parameter of shape {tuple(param.shape)} is in a group with "
            f"retraction={group['retraction']!r}; the sharded step exists for the package's "
            "'cayley' only (its coefficients come from p x p products). Use retraction='cayley'"
        )
