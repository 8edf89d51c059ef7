"""fora_optimizer: one StiefelAdam for a FoRA adapter (Stiefel group + AdamW group)."""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from stiefel_peft.distributed import ShardedStiefelAdam, is_sharded
from stiefel_peft.fora.config import (
    DEFAULT_STIEFEL_LR,
    STIEFEL_FACTORS,
    FoRAConfig,
    free_factor_rates,
)
from stiefel_peft.fora.rates import weight_scaled_rates
from stiefel_peft.geometry import orthogonality_error
from stiefel_peft.optim import StiefelAdam

__all__ = ["active_adapter", "constrained_parameters", "detect_stiefel_factor", "fora_optimizer"]

_ADAPTER_PART = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save)"
    r"\.([^.]+)(\.|$)"
)  # peft's per-adapter parameter names: ...q_proj.lora_A.<adapter>.weight


def _unwrapped(model: nn.Module) -> nn.Module:
    module = getattr(model, "module", None)  # DistributedDataParallel and friends
    return module if isinstance(module, nn.Module) and not hasattr(model, "peft_config") else model


def active_adapter(model: nn.Module) -> str:
    """The name of ``model``'s active peft adapter (``"default"`` when it has none named)."""
    name = getattr(_unwrapped(model), "active_adapter", "default")
    return name[0] if isinstance(name, (list, tuple)) else str(name)


def _adapter_of(parameter_name: str) -> str | None:
    """The adapter a parameter belongs to (from its peft name), or None for other parameters."""
    match = _ADAPTER_PART.search(parameter_name)
    return match.group(2) if match else None


def constrained_parameters(
    model: nn.Module, stiefel_factor: str = "B", adapter_name: str | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The trainable ``lora_B`` (or ``lora_A``) weights of one adapter, with their names.

    Args:
        model: a peft model.
        stiefel_factor: ``"B"`` or ``"A"``.
        adapter_name: the adapter (default: the active one).

    Raises:
        ValueError: on an unknown ``stiefel_factor``.
    """
    if stiefel_factor not in STIEFEL_FACTORS:
        raise ValueError(f"`stiefel_factor` must be 'B' or 'A', got {stiefel_factor!r}")
    adapter = adapter_name if adapter_name is not None else active_adapter(model)
    marker = f".lora_{stiefel_factor}.{adapter}.weight"
    return [
        (name, parameter)
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and name.endswith(marker)
    ]


def detect_stiefel_factor(model: nn.Module, adapter_name: str | None = None) -> str:
    """Which factor of an adapter is on the Stiefel manifold, read from its weights.

    ``"B"`` when every ``lora_B`` has orthonormal columns, ``"A"`` when every ``lora_A`` has
    orthonormal rows (float32 tolerance 1e-3 on ``||x^T x - I||_F``): how a FoRA adapter
    reloaded with peft alone (no FoRA settings) is recognised.

    Raises:
        ValueError: neither factor is orthonormal (not a FoRA adapter).
    """
    adapter = adapter_name if adapter_name is not None else active_adapter(model)
    for factor in STIEFEL_FACTORS:
        weights = [
            parameter.detach()
            for name, parameter in model.named_parameters()
            if name.endswith(f".lora_{factor}.{adapter}.weight")
        ]
        if not weights:
            break
        frames = [w if factor == "B" else w.mT for w in weights]  # (d, r), n >= p
        if all(
            f.shape[-2] >= f.shape[-1] and float(orthogonality_error(f.float())) <= 1e-3
            for f in frames
        ):
            return factor
    raise ValueError(
        f"adapter {adapter!r} has neither lora_B with orthonormal columns nor lora_A with "
        "orthonormal rows: it is not a FoRA adapter. Pass stiefel_factor= and orthonormalize "
        "the factor first, or start from apply_fora"
    )


def _settings(model: nn.Module, adapter: str) -> FoRAConfig | None:
    owner = _unwrapped(model)
    configs = getattr(owner, "fora_configs", None)
    if isinstance(configs, dict) and adapter in configs:
        return configs[adapter]
    config = getattr(owner, "fora_config", None)
    return config if config is not None and not isinstance(configs, dict) else None


def fora_optimizer(
    model: nn.Module,
    lr: float | None = None,
    stiefel_lr: float | None = None,
    *,
    relative_lr: float | None = None,
    distance_estimate: bool = False,
    stiefel_factor: str | None = None,
    retraction: str | None = None,
    adapter_name: str | None = None,
    weight_decay: float = 0.0,
    sharded: bool | None = None,
    **options: Any,
) -> StiefelAdam:
    """One :class:`~stiefel_peft.optim.StiefelAdam` for one FoRA adapter of ``model``.

    Group 1 (``stiefel=True``, ``lr=stiefel_lr``): the adapter's constrained factors.
    Then, stepped exactly as ``torch.optim.AdamW`` (``stiefel=False``, ``weight_decay``): the
    free factors (``lora_A`` when ``lora_B`` is constrained), one group per layer at
    ``relative_lr * RMS(W)`` of the weight it adapts (:mod:`stiefel_peft.fora.rates`), or one
    group at ``lr`` when the rates are absolute; and every other trainable parameter that is
    not another adapter's (a classifier head) at ``lr``. Other adapters are left untouched. Use
    it as ``transformers.Trainer(..., optimizers=(fora_optimizer(model), None))``: the Stiefel
    step then happens once per optimizer step, after gradient accumulation, clipping and
    unscaling. Parameters are passed with their names, so errors name them.

    Settings come from, in order: the arguments; the adapter's FoRA settings
    (``model.fora_configs[adapter]``, set by ``apply_fora`` or
    :func:`~stiefel_peft.fora.load_fora_adapter`); for an adapter reloaded with peft alone,
    the constrained factor read from its weights (:func:`detect_stiefel_factor`) and the
    library defaults (the free factors at :data:`~stiefel_peft.fora.config.DEFAULT_RELATIVE_LR`
    per unit of RMS(W), the rest at :data:`~stiefel_peft.fora.config.DEFAULT_LR`, the
    constrained factors at :data:`~stiefel_peft.fora.config.DEFAULT_STIEFEL_LR`, ``"cayley"``;
    :func:`~stiefel_peft.fora.config.free_factor_rates`). An ``lr`` argument without
    ``relative_lr`` makes every rate absolute, whatever the settings say.

    Args:
        model: a ``PeftModel`` (or a DDP wrapper of one).
        lr: AdamW learning rate of the other trainable parameters, and of the free factors
            when the rates are absolute (given without ``relative_lr``).
        stiefel_lr: Stiefel learning rate of the constrained factors.
        relative_lr: the free factors' rate per unit of weight RMS (the default, at
            :data:`~stiefel_peft.fora.config.DEFAULT_RELATIVE_LR`, when no rate is given).
        distance_estimate: step the free factors and the other parameters with Prodigy's
            estimated rate ``d`` (StiefelAdam's ``distance_estimate``,
            :mod:`stiefel_peft.optim.distance`) instead of a fixed one; ``lr`` is then the
            multiplier of ``d`` (default 1.0, not a rate).
            The constrained factors keep ``stiefel_lr``. An option, not the default: see
            docs/results.md for how it compares with fixed rates.
        stiefel_factor: ``"B"`` or ``"A"``.
        retraction: a registered retraction.
        adapter_name: the adapter to train (default: the active one).
        weight_decay: decoupled weight decay of the AdamW groups (the Stiefel group has none:
            the constraint fixes the factor's norm).
        sharded: build a :class:`~stiefel_peft.distributed.ShardedStiefelAdam` (True), a plain
            ``StiefelAdam`` (False), or decide by whether a constrained factor is already a
            DTensor (None, default). Pass True when a wrapper shards the model after the
            optimizer is built (accelerate's FSDP2 plugin).
        **options: passed to ``StiefelAdam`` (``betas``, ``eps``, ``second_moment``, ...).

    Raises:
        ValueError: the adapter has no trainable constrained factor, or no FoRA settings and
            no orthonormal factor; a rate is not positive; a weight has no scale to follow
            (:func:`~stiefel_peft.fora.rates.weight_rms`); or ``distance_estimate`` is not a
            bool or comes with ``relative_lr``.
    """
    if not isinstance(distance_estimate, bool):
        raise ValueError(f"`distance_estimate` must be a bool, got {distance_estimate!r}")
    if distance_estimate and relative_lr is not None:
        raise ValueError(
            "pass either `relative_lr` (rates scaled to the weights) or `distance_estimate=True` "
            "(a rate estimated while training), not both"
        )
    adapter = adapter_name if adapter_name is not None else active_adapter(model)
    config = _settings(model, adapter)
    if stiefel_factor is None:
        stiefel_factor = config.stiefel_factor if config else detect_stiefel_factor(model, adapter)
    if distance_estimate:
        lr = 1.0 if lr is None else lr  # the multiplier of the estimate
    else:
        if relative_lr is None and lr is None and config:  # no rate given: the settings decide
            lr, relative_lr = config.lr, config.relative_lr
        lr, relative_lr = free_factor_rates(lr, relative_lr)
    stiefel_lr = (
        stiefel_lr
        if stiefel_lr is not None
        else (config.stiefel_lr if config else DEFAULT_STIEFEL_LR)
    )
    retraction = retraction or (config.retraction if config else "cayley")
    constrained = constrained_parameters(model, stiefel_factor, adapter)
    if not constrained:
        raise ValueError(
            f"found no trainable lora_{stiefel_factor} weights of adapter {adapter!r} in "
            f"{type(model).__name__}; call apply_fora(model) first, pass stiefel_factor= "
            "matching your adapter, or reload it with is_trainable=True"
        )
    constrained_ids = {id(parameter) for _, parameter in constrained}
    free_rates = (
        weight_scaled_rates(model, "A" if stiefel_factor == "B" else "B", adapter, relative_lr)
        if relative_lr is not None
        else {}
    )
    free: list[tuple[str, nn.Parameter]] = []  # the free factors, when their rates scale
    others: list[tuple[str, nn.Parameter]] = []
    for name, parameter in model.named_parameters():
        if (
            parameter.requires_grad
            and id(parameter) not in constrained_ids
            and _adapter_of(name) in (None, adapter)
        ):
            (free if name in free_rates else others).append((name, parameter))
    groups: list[dict[str, Any]] = [
        {
            "params": [p for _, p in constrained],
            "param_names": [n for n, _ in constrained],
            "stiefel": True,
            "lr": stiefel_lr,
            "weight_decay": 0.0,
        }
    ]
    for name, parameter in free:  # one group per layer: its own rate
        groups.append({
            "params": [parameter], "param_names": [name],
            "stiefel": False, "lr": free_rates[name], "weight_decay": weight_decay,
        })  # fmt: skip
    if others:
        groups.append({
            "params": [p for _, p in others], "param_names": [n for n, _ in others],
            "stiefel": False, "lr": lr, "weight_decay": weight_decay,
            **({"distance_estimate": True} if distance_estimate else {}),
        })  # fmt: skip
    if sharded is None:
        sharded = any(is_sharded(parameter) for _, parameter in constrained)
    optimizer_class = ShardedStiefelAdam if sharded else StiefelAdam
    return optimizer_class(groups, lr=lr, retraction=retraction, **options)
