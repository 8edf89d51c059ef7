"""fora_optimizer: one StiefelAdam for a FoRA model (Stiefel group + AdamW group)."""

from __future__ import annotations

from typing import Any

from torch import nn

from stiefel_peft.distributed import ShardedStiefelAdam, is_sharded
from stiefel_peft.fora.config import STIEFEL_FACTORS
from stiefel_peft.optim import StiefelAdam

__all__ = ["constrained_parameters", "fora_optimizer"]


def constrained_parameters(
    model: nn.Module, stiefel_factor: str = "B"
) -> list[tuple[str, nn.Parameter]]:
    """The trainable ``lora_B`` (or ``lora_A``) weights of every adapter, with their names.

    Raises:
        ValueError: on an unknown ``stiefel_factor``.
    """
    if stiefel_factor not in STIEFEL_FACTORS:
        raise ValueError(f"`stiefel_factor` must be 'B' or 'A', got {stiefel_factor!r}")
    marker = f".lora_{stiefel_factor}."
    return [
        (name, parameter)
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and marker in name and name.endswith(".weight")
    ]


def fora_optimizer(
    model: nn.Module,
    lr: float | None = None,
    stiefel_lr: float | None = None,
    *,
    stiefel_factor: str | None = None,
    retraction: str | None = None,
    weight_decay: float = 0.0,
    sharded: bool | None = None,
    **options: Any,
) -> StiefelAdam:
    """One :class:`~stiefel_peft.optim.StiefelAdam` for a model made by ``apply_fora``.

    Group 1 (``stiefel=True``, ``lr=stiefel_lr``): the constrained LoRA factors.
    Group 2 (``stiefel=False``, ``lr=lr``, ``weight_decay``): every other trainable parameter
    (the other factor, a classifier head), stepped exactly as ``torch.optim.AdamW``.
    Use it as ``transformers.Trainer(..., optimizers=(fora_optimizer(model), None))``: the
    Stiefel step then happens once per optimizer step, after gradient accumulation, clipping
    and unscaling.

    Args:
        model: the ``PeftModel`` returned by ``apply_fora`` (or any peft LoRA model, with
            ``stiefel_factor`` given and the factors already orthonormal).
        lr: AdamW learning rate (default: ``model.fora_config.lr``, 2e-4).
        stiefel_lr: Stiefel learning rate (default: ``model.fora_config.stiefel_lr``, 1e-3).
        stiefel_factor: ``"B"`` or ``"A"`` (default: the model's FoRA config).
        retraction: a registered retraction (default: the model's FoRA config).
        weight_decay: decoupled weight decay of the AdamW group (the Stiefel group has none:
            the constraint fixes the factor's norm).
        sharded: build a :class:`~stiefel_peft.distributed.ShardedStiefelAdam` (True), a plain
            ``StiefelAdam`` (False), or decide by whether a constrained factor is already a
            DTensor (None, default). Pass True when a wrapper shards the model after the
            optimizer is built (accelerate's FSDP2 plugin).
        **options: passed to ``StiefelAdam`` (``betas``, ``eps``, ``second_moment``, ...).

    Under DDP (``model`` wrapped, e.g. by ``accelerate``) the FoRA config is read from
    ``model.module``. When a constrained factor is a DTensor (FSDP2 ``fully_shard``) the
    optimizer is a :class:`~stiefel_peft.distributed.ShardedStiefelAdam`, which steps the
    factors on their local rows (``docs/distributed.md``).

    Raises:
        ValueError: if the model has no constrained factor that requires grad.
    """
    config = getattr(model, "fora_config", None)
    if config is None and isinstance(getattr(model, "module", None), nn.Module):
        config = getattr(model.module, "fora_config", None)  # DistributedDataParallel wrapper
    lr = lr if lr is not None else (config.lr if config is not None else 2e-4)
    stiefel_lr = (
        stiefel_lr
        if stiefel_lr is not None
        else (config.stiefel_lr if config is not None else 1e-3)
    )
    factor = stiefel_factor or (config.stiefel_factor if config is not None else "B")
    retraction = retraction or (config.retraction if config is not None else "cayley")
    constrained = constrained_parameters(model, factor)
    if not constrained:
        raise ValueError(
            f"found no trainable lora_{factor} weights in {type(model).__name__}; call "
            "apply_fora(model) first, or pass stiefel_factor= matching your adapter"
        )
    constrained_ids = {id(parameter) for _, parameter in constrained}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in constrained_ids]
    groups: list[dict[str, Any]] = [
        {
            "params": [p for _, p in constrained],
            "stiefel": True,
            "lr": stiefel_lr,
            "weight_decay": 0.0,
        }
    ]
    if others:
        groups.append({"params": others, "stiefel": False, "lr": lr, "weight_decay": weight_decay})
    if sharded is None:
        sharded = any(is_sharded(parameter) for _, parameter in constrained)
    optimizer_class = ShardedStiefelAdam if sharded else StiefelAdam
    return optimizer_class(groups, lr=lr, retraction=retraction, **options)
