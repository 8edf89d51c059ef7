"""Weight-scaled learning rates: each adapted layer's free factor steps in proportion to the
scale of the weight it adapts.

FoRA's constrained factor is orthonormal, so the update ``dW = (alpha / r) B A`` has
``||dW||_F = (alpha / r) ||A||_F``: Adam moves ``A`` by about its learning rate per entry and
per step whatever the gradient's scale, so a fixed rate gives every layer the same absolute
update. Layers differ in scale (SmolLM2-135M's adapted weights have an RMS of about 0.2,
Gemma-3-270M's 0.04 and its ``down_proj`` 0.016), so a fixed rate is a large relative change
for one model and a small one for another. With a rate relative to the weight,

    lr(layer) = relative_lr * RMS(W),    RMS(W) = ||W||_F / sqrt(d_out * d_in),

the relative change ``||dW|| / ||W||`` is about the same for every layer and model, and the
adapted output is invariant to a rescaling of a layer that the network undoes (``W -> s W``
with its input scaled by ``1 / s``). This is Adafactor's parameter scaling (Shazeer and Stern
2018), taken from the frozen weight because ``A`` starts at zero. It is the library's default
(:data:`~stiefel_peft.fora.config.DEFAULT_RELATIVE_LR`, 8.5e-3; ``FoRAConfig.lr`` set alone asks
for one fixed rate instead): in the quality study (docs/results.md, item 3) it is within 2
points of each task's best configuration on 7 of ten cells over three models, worst 2.2, where
the best fixed rate, 1e-3, is 19.3 points short on Gemma-3-270M arithmetic. At 5e-3 it had
fallen 20.1 short on a task that wants a large rate (family relationships); 8.5e-3 was chosen
after that, on the same cells, so those ten readings are a fit, not a test; on the two cells
read after it was fixed it fell 10.0 points short (Gemma-3-270M, family relationships) and 4.2
short (Gemma-3-270M, leg counting).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["weight_rms", "weight_scaled_rates"]


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of ``layer`` as a dense tensor (a bitsandbytes 4-bit weight dequantized)."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit: packed bytes plus a QuantState
        import bitsandbytes.functional as bnb_functional  # deferred: optional dependency

        return bnb_functional.dequantize_4bit(weight.data, quant_state)
    return weight.detach()


def weight_rms(layer: nn.Module) -> float:
    """``RMS(W) = ||W||_F / sqrt(d_out * d_in)`` of a linear layer's weight, in float64.

    ``layer`` is an ``nn.Linear``, a bitsandbytes ``Linear4bit`` (dequantized for the sum) or a
    peft LoRA layer (its base layer is read). A DTensor weight (FSDP2) is reduced across its
    shards. Cost O(d_out d_in), once.

    Raises:
        ValueError: the layer has no 2-D weight, or its weight is zero or not finite (no scale to
            follow: pass an absolute ``lr`` instead).
    """
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(base).__name__} has no weight to scale a learning rate by")
    dense = _dense_weight(base)
    if dense.dim() != 2:
        raise ValueError(
            f"weight-scaled rates need a 2-D linear weight, got shape {tuple(dense.shape)}"
        )
    mean_square = dense.double().pow(2).mean()
    if hasattr(mean_square, "full_tensor"):  # a DTensor: sum over every shard
        mean_square = mean_square.full_tensor()
    rms = math.sqrt(float(mean_square))
    if not math.isfinite(rms) or rms == 0.0:
        raise ValueError(
            f"the weight of {type(base).__name__} has RMS {rms}: a weight-scaled learning rate "
            "needs a finite, non-zero weight; pass an absolute lr instead"
        )
    return rms


def weight_scaled_rates(
    model: nn.Module, factor: str, adapter_name: str, relative_lr: float
) -> dict[str, float]:
    """``relative_lr * RMS(W)`` for each trainable ``lora_<factor>`` weight of one adapter.

    Args:
        model: a peft model.
        factor: ``"A"`` or ``"B"``, the factor whose rate follows the weight (FoRA's free one).
        adapter_name: the adapter.
        relative_lr: the rate per unit of weight RMS, positive and finite.

    Returns:
        The parameter name of each such factor mapped to its learning rate.

    Raises:
        ValueError: ``relative_lr`` is not a positive finite number, or a base weight has no
            usable scale (see :func:`weight_rms`).
    """
    if (
        isinstance(relative_lr, bool)
        or not isinstance(relative_lr, (int, float))
        or not math.isfinite(relative_lr)
        or relative_lr <= 0
    ):
        raise ValueError(
            f"`relative_lr` must be a positive rate per unit of weight RMS, got {relative_lr!r}"
        )
    marker = f".lora_{factor}.{adapter_name}.weight"
    modules = dict(model.named_modules())
    rates: dict[str, float] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and name.endswith(marker):
            layer = modules[name.removesuffix(marker)]
            rates[name] = relative_lr * weight_rms(layer)
    return rates
