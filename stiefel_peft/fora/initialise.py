"""The initialise step of FoRA: named initialisations of the LoRA factors (a registry).

Like peft's ``init_lora_weights``, the choice is a name (``FoRAConfig(init=...)``):

- ``"orthonormal"`` (default): the constrained factor a Haar-random orthonormal frame (seeded,
  drawn in float64 on the CPU so every device and dtype gets the same frame), the other
  factor zero. ``B A = 0``: the adapted model starts exactly as the base model.
- ``"gradient"``: the constrained factor from the calibration gradient ``G = dL/dW`` of each
  adapted base weight, the other factor zero. With ``A = 0`` the first steps move only ``A``,
  along ``s B^T G``, so ``B`` = the top-r left singular vectors of ``G`` maximises
  ``||B^T G||_F`` over orthonormal ``B`` (the first-order loss decrease; a random frame keeps
  about ``r / d_out`` of it). For ``stiefel_factor="A"`` the rows of ``A`` are the top-r right
  singular vectors. Still a point of the manifold, so the optimiser is unchanged. ``G`` is
  summed from each layer's inputs and output gradients (no weight gradient, so it works on a
  quantized base too); cost: one forward/backward per calibration batch plus an SVD per layer.
- ``"peft"``: peft's own initialisation (A Kaiming-uniform, B = 0), for LoRA baselines trained
  by a Euclidean optimizer; not orthonormal, so ``fora_optimizer`` refuses it.

Researchers add their own with :func:`register_initialisation`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import peft
import torch
from torch import nn

from stiefel_peft.fisher.capture import LinearCapture, frozen_model
from stiefel_peft.fora.config import FoRAConfig
from stiefel_peft.fora.plan import FoRAPlan
from stiefel_peft.geometry import random_stiefel

__all__ = ["INITIALISATIONS", "initialise_adapters", "lora_layers", "register_initialisation"]

Initialisation = Callable[..., dict[str, Any]]
INITIALISATIONS: dict[str, Initialisation] = {}


def register_initialisation(
    name: str, *, replace: bool = False
) -> Callable[[Initialisation], Initialisation]:
    """Decorator adding ``function(model, plan, config, calibration, adapter_name) -> info``
    to :data:`INITIALISATIONS` (``info``: a dict recorded in the report's ``extra``).

    Raises:
        ValueError: ``name`` is empty, or taken and ``replace`` is False.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    if name in INITIALISATIONS and not replace:
        raise ValueError(f"an initialisation named {name!r} is already registered")

    def decorator(function: Initialisation) -> Initialisation:
        INITIALISATIONS[name] = function
        return function

    return decorator


def lora_layers(model: peft.PeftModel, plan: FoRAPlan, adapter_name: str) -> dict[str, nn.Module]:
    """The peft LoRA layers of the plan's adapted modules, by module name."""
    by_name = dict(model.base_model.model.named_modules())
    return {name: by_name[name] for name in plan.adapted_modules}


def _factors(layer: nn.Module, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight  # (r, in), (out, r)


def _write(layer: nn.Module, adapter_name: str, frame: torch.Tensor, factor: str) -> None:
    """The constrained factor <- ``frame`` ((d, r), orthonormal columns), the other <- 0."""
    lora_a, lora_b = _factors(layer, adapter_name)
    if factor == "B":
        lora_b.copy_(frame)
        lora_a.zero_()
    else:
        lora_a.copy_(frame.mT)  # rows orthonormal
        lora_b.zero_()


@register_initialisation("orthonormal")
@torch.no_grad()
def orthonormal(
    model: peft.PeftModel,
    plan: FoRAPlan,
    config: FoRAConfig,
    calibration: Iterable[Mapping[str, Any]] | None,
    adapter_name: str,
) -> dict[str, Any]:
    """Haar-random constrained factor (seeded by ``config.seed``), the other factor zero."""
    generator = torch.Generator().manual_seed(config.seed)
    for name, layer in lora_layers(model, plan, adapter_name).items():
        d_in, d_out = plan.features[name]
        size = d_out if config.stiefel_factor == "B" else d_in
        rank = plan.rank_of(name, config.r)
        frame = random_stiefel(size, rank, dtype=torch.float64, generator=generator)
        _write(layer, adapter_name, frame, config.stiefel_factor)
    return {}


@register_initialisation("gradient")
@torch.no_grad()
def gradient(
    model: peft.PeftModel,
    plan: FoRAPlan,
    config: FoRAConfig,
    calibration: Iterable[Mapping[str, Any]] | None,
    adapter_name: str,
) -> dict[str, Any]:
    """The constrained factor from the top-r singular vectors of the calibration gradient.

    Raises:
        ValueError: no calibration data, or a layer with ``min(d_out, d_in) < r``.
    """
    if calibration is None:
        raise ValueError(
            "init='gradient' needs calibration batches (the gradient of the task loss); pass "
            "calibration=[...] or use init='orthonormal'"
        )
    layers = lora_layers(model, plan, adapter_name)
    bases = {name: layer.get_base_layer() for name, layer in layers.items()}
    sums: dict[str, torch.Tensor] = {}

    def accumulate(name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        x_all = x.reshape(-1, x.shape[-1]).double()  # (tokens, d_in)
        delta_all = delta.reshape(-1, delta.shape[-1]).double()  # (tokens, d_out)
        gradient_sum = delta_all.T @ x_all  # dL/dW: (d_out, d_in), every token of the batch
        sums[name] = sums[name] + gradient_sum if name in sums else gradient_sum

    device = next(model.parameters()).device
    batches = 0
    with model.disable_adapter(), frozen_model(model), LinearCapture(bases, accumulate) as capture:
        for batch in calibration:
            inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            capture.clear()
            loss = model(**inputs).loss
            torch.autograd.grad(loss, capture.leaves, allow_unused=True)
            batches += 1
    if batches == 0:
        raise ValueError("init='gradient' got no calibration batch")
    for name, layer in layers.items():
        left, _, right_h = torch.linalg.svd(
            sums[name], full_matrices=False
        )  # (d_out, k), (k, d_in)
        rank = plan.rank_of(name, config.r)
        if left.shape[1] < rank:
            raise ValueError(
                f"init='gradient' needs min(d_out, d_in) >= r={rank}; {name!r} has "
                f"{tuple(sums[name].shape)}"
            )
        frame = left[:, :rank] if config.stiefel_factor == "B" else right_h[:rank].mT
        _write(layer, adapter_name, frame.contiguous(), config.stiefel_factor)
    return {"gradient_batches": batches}


@register_initialisation("peft")
def peft_default(
    model: peft.PeftModel,
    plan: FoRAPlan,
    config: FoRAConfig,
    calibration: Iterable[Mapping[str, Any]] | None,
    adapter_name: str,
) -> dict[str, Any]:
    """Leave peft's own initialisation (A Kaiming-uniform, B = 0): LoRA baselines."""
    return {}


def initialise_adapters(
    model: peft.PeftModel,
    plan: FoRAPlan,
    config: FoRAConfig,
    calibration: Iterable[Mapping[str, Any]] | None = None,
    adapter_name: str = "default",
) -> dict[str, Any]:
    """Initialise the adapter's factors with ``INITIALISATIONS[config.init]``; its info dict.

    Raises:
        ValueError: an unknown name (the message lists the registered ones), or as the
            initialisation says.
    """
    if config.init not in INITIALISATIONS:
        raise ValueError(
            f"`init` must be one of {sorted(INITIALISATIONS)}, got {config.init!r} (add your own "
            "with stiefel_peft.fora.register_initialisation)"
        )
    return INITIALISATIONS[config.init](model, plan, config, calibration, adapter_name)
