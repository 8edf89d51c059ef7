"""Data-parallel (DDP) and sharded (FSDP2 / DTensor) training support.

- :class:`ShardedStiefelAdam`: ``StiefelAdam`` that steps DTensor Stiefel factors sharded along
  their long dimension with p x p all-reduces only (the same functional step, given a
  reduction: :mod:`stiefel_peft.optim.functional`), never a gather.
- :func:`stiefel_shard_placement`: a ``shard_placement_fn`` for ``fully_shard`` that shards
  wide Stiefel factors (FoRA's ``lora_A``) along their long dimension.
- :func:`default_process_group`: the group ``apply_fora`` reduces Fisher scores over.

Plain ``StiefelAdam`` / ``fora_optimizer`` need nothing under DDP: the gradients are averaged
before the step, which is deterministic, so the replicas stay identical. See
``docs/distributed.md``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .optimizer import ShardedStiefelAdam, frame_all_reduce, stiefel_shard_placement

__all__ = [
    "ShardedStiefelAdam",
    "default_process_group",
    "frame_all_reduce",
    "is_sharded",
    "stiefel_shard_placement",
]


def default_process_group() -> Any:
    """``torch.distributed.group.WORLD`` when initialised with more than one process, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter)."""
    from stiefel_peft.optim.buckets import is_distributed_tensor

    return is_distributed_tensor(param)
