"""Worker functions run by :func:`tests.distributed.launch.run_workers` (one per rank).

Each returns a dict of CPU tensors / plain values that the test compares with a single-process
reference computed by the same helpers here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from stiefel_peft.distributed import ShardedStiefelAdam, stiefel_shard_placement
from stiefel_peft.fisher import estimate_fisher
from stiefel_peft.fora import (
    apply_fora,
    constrained_parameters,
    fora_optimizer,
    weight_scaled_rates,
)
from stiefel_peft.geometry import random_stiefel
from stiefel_peft.optim import StiefelAdam
from tests.tiny_models import VOCAB_SIZE, tiny_model_case

RANK = 4
STEPS = 4
GLOBAL_BATCH = 4
SEQ_LEN = 8
STIEFEL_LR = 0.05
LR = 0.01
FISHER_ESTIMATORS = ("empirical", "empirical_batch", "kfac_trace", "taylor")
SELECTION_BUDGET = 0.67  # 2 of the 3 llama blocks


# --- training: DDP, FSDP2 and the single-process reference ---------------------------------
def global_batches() -> list[dict[str, torch.Tensor]]:
    """Unpadded, fully labelled batches: every rank's share has the same token count, so the
    mean of the per-rank mean losses (what DDP/FSDP average) is the global batch's mean loss."""
    generator = torch.Generator().manual_seed(123)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(1, VOCAB_SIZE, (GLOBAL_BATCH, SEQ_LEN), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return batches


def fora_model(stiefel_factor: str) -> nn.Module:
    model = tiny_model_case("llama").build(seed=0)
    return apply_fora(model, budget=1.0, r=RANK, lora_dropout=0.0, stiefel_factor=stiefel_factor)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, world_size: int) -> None:
    for batch in global_batches():
        local = {key: value.chunk(world_size)[rank] for key, value in batch.items()}
        model(**local).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def adapter_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA factor, whole (a DTensor is gathered, after training), by a wrapper-free name."""
    factors = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            value = param.full_tensor() if hasattr(param, "full_tensor") else param
            factors[name.removeprefix("module.")] = value.detach().clone()
    return factors


def reference_training(stiefel_factor: str) -> dict[str, torch.Tensor]:
    """One process, the concatenated global batches."""
    model = fora_model(stiefel_factor)
    initial = adapter_factors(model)
    train(model, fora_optimizer(model, lr=LR, stiefel_lr=STIEFEL_LR), rank=0, world_size=1)
    return {"initial": initial, "final": adapter_factors(model)}


def ddp_training(rank: int, world_size: int) -> dict[str, Any]:
    model = fora_model("B")
    wrapped = nn.parallel.DistributedDataParallel(model)
    optimizer = fora_optimizer(wrapped, lr=LR, stiefel_lr=STIEFEL_LR)
    train(wrapped, optimizer, rank, world_size)
    return {"optimizer": type(optimizer).__name__, "factors": adapter_factors(model)}


# --- Fisher scores and block selection --------------------------------------------------------
def calibration_shard(rank: int) -> list[dict[str, torch.Tensor]]:
    """Rank 0's shard alone selects blocks [0, 1], rank 1's [0, 2] (checked by the test)."""
    case = tiny_model_case("llama")
    return [case.make_batch(batch_size=3, seq_len=8, seed=2 * rank + i) for i in range(2)]


def fisher_model() -> nn.Module:
    return tiny_model_case("llama").build(seed=0, dtype=torch.float64)


def fisher_and_selection(rank: int, world_size: int) -> dict[str, Any]:
    shard = calibration_shard(rank)
    scores = {
        estimator: estimate_fisher(
            fisher_model(), shard, estimator, process_group=dist.group.WORLD
        ).per_module
        for estimator in FISHER_ESTIMATORS
    }
    selected = apply_fora(fisher_model(), SELECTION_BUDGET, calibration=shard, r=RANK)
    alone = apply_fora(fisher_model(), SELECTION_BUDGET, calibration=shard, r=RANK,
                       process_group=None)  # fmt: skip
    return {
        "scores": scores,
        "selected": selected.fora_report.selected_blocks,
        "selected_alone": alone.fora_report.selected_blocks,
        "examples": selected.fora_report.calibration_examples,
    }


def ddp_and_fisher(rank: int, world_size: int) -> dict[str, Any]:
    return {"ddp": ddp_training(rank, world_size), "fisher": fisher_and_selection(rank, world_size)}


# --- sharded (DTensor / FSDP2) Stiefel step ---------------------------------------------------
@contextmanager
def counted_collectives() -> Iterator[dict[str, Any]]:
    """Count every collective (``CommDebugMode``) and record the sizes given to all_reduce."""
    record: dict[str, Any] = {"all_reduce_sizes": []}
    original = dist.all_reduce

    def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        record["all_reduce_sizes"].append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = all_reduce
    try:
        with CommDebugMode() as mode:
            yield record
    finally:
        dist.all_reduce = original
    record["counts"] = {str(op): count for op, count in mode.get_comm_counts().items()}


def _dtensor_problem() -> dict[str, tuple[torch.Tensor, int]]:
    """Whole frames and the dimension they are sharded on (always the long one)."""
    generator = torch.Generator().manual_seed(0)
    frame = lambda n, p: random_stiefel(n, p, generator=generator)  # noqa: E731
    return {
        "tall_a": (frame(40, 4), 0),
        "tall_b": (frame(40, 4), 0),  # same bucket as tall_a
        "uneven": (frame(37, 3), 0),  # 19 + 18 rows
        "wide": (frame(36, 4).mT.contiguous(), 1),  # (4, 36), orthonormal rows, Shard(1)
        "stack": (torch.stack([frame(30, 3), frame(30, 3)]), 1),  # (2, 30, 3)
    }


def sharded_step(rank: int, world_size: int, second_moment: str) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (world_size,))
    problem = _dtensor_problem()
    sharded = [nn.Parameter(distribute_tensor(full, mesh, [Shard(dim)]))
               for full, dim in problem.values()]  # fmt: skip
    whole = [nn.Parameter(full.clone()) for full, _ in problem.values()]
    options = dict(lr=0.05, second_moment=second_moment, check_every=2)
    optimizer = ShardedStiefelAdam(sharded, **options)
    reference = StiefelAdam(whole, **options)
    generator = torch.Generator().manual_seed(1)
    records = []
    for _ in range(3):
        for param, copy, (_, dim) in zip(sharded, whole, problem.values(), strict=True):
            grad = torch.randn(copy.shape, generator=generator)  # same draws on every rank
            copy.grad = grad
            param.grad = distribute_tensor(grad, mesh, [Shard(dim)])
        with counted_collectives() as record:
            optimizer.step()
        records.append(record)
        reference.step()
    return {
        "sharded": [param.full_tensor().detach().clone() for param in sharded],
        "whole": [param.detach().clone() for param in whole],
        "local_rows": [param.to_local().shape for param in sharded],
        "records": records,
    }


def _error_message(build: Callable[[], object]) -> str:
    try:
        build()
    except ValueError as error:
        return str(error)
    return ""


def rejections(world_size: int) -> dict[str, str]:
    mesh = init_device_mesh("cpu", (world_size,))
    wide = random_stiefel(24, 4).mT.contiguous()  # (4, 24)
    tall = random_stiefel(24, 4)
    short_sharded = nn.Parameter(distribute_tensor(wide, mesh, [Shard(0)]))
    long_sharded = nn.Parameter(distribute_tensor(tall, mesh, [Shard(0)]))
    swapped = StiefelAdam([nn.Parameter(tall.clone())])  # built before sharding, then swapped

    def step_after_swap() -> None:
        swapped.param_groups[0]["params"] = [long_sharded]
        long_sharded.grad = distribute_tensor(torch.zeros_like(tall), mesh, [Shard(0)])
        swapped.step()

    return {
        "plain_optimizer": _error_message(lambda: StiefelAdam([long_sharded])),
        "swapped_after_construction": _error_message(step_after_swap),
        "short_dimension": _error_message(lambda: ShardedStiefelAdam([short_sharded])),
        "retraction": _error_message(lambda: ShardedStiefelAdam([long_sharded], retraction="qr")),
    }


def fsdp_training(rank: int, world_size: int, stiefel_factor: str) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    model = fora_model(stiefel_factor)
    factors = [param for _, param in constrained_parameters(model, stiefel_factor)]
    placement = stiefel_shard_placement(factors)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    optimizer = fora_optimizer(model, lr=LR, stiefel_lr=STIEFEL_LR)
    steps = []
    original_step = optimizer.step

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        with counted_collectives() as record:
            result = original_step(*args, **kwargs)
        steps.append(record)
        return result

    optimizer.step = counted_step
    train(model, optimizer, rank, world_size)
    constrained = [param for _, param in constrained_parameters(model, stiefel_factor)]
    return {
        "optimizer": type(optimizer).__name__,
        "placements": sorted({str(param.placements) for param in constrained}),
        "factors": adapter_factors(model),
        "records": steps,
    }


def fsdp_weight_scaled_rates(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    """The weight-scaled rates of lora_A before and after fully_shard (DTensor base weights)."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    model = fora_model("B")
    whole = weight_scaled_rates(model, "A", "default", 1e-2)
    factors = [param for _, param in constrained_parameters(model, "B")]
    placement = stiefel_shard_placement(factors)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    sharded = weight_scaled_rates(model, "A", "default", 1e-2)
    optimizer = fora_optimizer(model, relative_lr=1e-2)
    grouped = {group["param_names"][0]: group["lr"] for group in optimizer.param_groups[1:]}
    return {"whole": whole, "sharded": sharded, "grouped": grouped}


def fsdp(rank: int, world_size: int) -> dict[str, Any]:
    return {
        "weight_scaled_rates": fsdp_weight_scaled_rates(rank, world_size),
        "step_matrix": sharded_step(rank, world_size, "matrix"),
        "step_element": sharded_step(rank, world_size, "element"),
        "rejections": rejections(world_size),
        "fsdp_B": fsdp_training(rank, world_size, "B"),
        "fsdp_A": fsdp_training(rank, world_size, "A"),
    }
