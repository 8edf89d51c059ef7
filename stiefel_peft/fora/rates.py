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
2018), taken from the frozen weight because ``A`` starts at zero. It is an option
(``FoRAConfig.relative_lr``), not the default: in the quality study (docs/results.md) it came
closer than any fixed rate on SmolLM2-135M and Gemma-3-270M, but an encoder
(all-MiniLM-L6-v2, RMS ~0.07) wanted a larger rate than its small weights give.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "free_factor_gradient_rms",
    "gradient_scaled_rate",
    "weight_rms",
    "weight_scaled_rates",
]


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


def _check_positive(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")


def free_factor_gradient_rms(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    factor: str,
    adapter_name: str,
) -> float:
    """RMS over every entry of one adapter's free factors of their mean loss gradient.

    .. math:: g = \\sqrt{\\frac{1}{N} \\sum_{i=1}^{N}
              \\Big(\\frac{1}{K} \\sum_{k=1}^{K} \\frac{\\partial L_k}{\\partial \\theta_i}\\Big)^2}

    over the ``N`` entries ``theta_i`` of every trainable ``lora_<factor>`` weight of the adapter
    and the ``K`` batches, ``L_k = model(**batch_k).loss``. Read at initialisation (the free
    factor is zero, the constrained one orthonormal), it measures how strongly the task pulls
    on the adapter. The model runs in eval mode (no dropout) and is put back in its mode; no
    ``.grad`` is written (``torch.autograd.grad``). Cost: one forward and backward per batch.

    Args:
        model: a peft model whose output has ``.loss`` given the batch's labels.
        batches: dicts of tensors on the model's device, passed as keyword arguments.
        factor: ``"A"`` or ``"B"``, the free factor.
        adapter_name: the adapter.

    Returns:
        ``g`` in float64 precision, as a Python float.

    Raises:
        ValueError: no trainable ``lora_<factor>`` weights, no batches, a batch whose output has
            no finite ``.loss``, or a zero or non-finite gradient (no scale to follow).
    """
    marker = f".lora_{factor}.{adapter_name}.weight"
    parameters = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(marker)]
    if not parameters:
        raise ValueError(
            f"found no trainable lora_{factor} weights of adapter {adapter_name!r}; "
            "call apply_fora(model) first"
        )
    sums = [torch.zeros_like(p, dtype=torch.float64) for p in parameters]
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            loss = model(**batch).loss
            if loss is None or not torch.isfinite(loss):
                raise ValueError(
                    f"batch {count} gave the loss {loss!r}: a gradient-scaled rate needs "
                    "batches with labels and a finite loss"
                )
            gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
            for total, gradient in zip(sums, gradients, strict=True):
                if gradient is not None:
                    total += gradient.double()
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("a gradient-scaled rate needs at least one batch, got none")
    square = sum(float(total.pow(2).sum()) for total in sums)
    entries = sum(total.numel() for total in sums)
    rms = math.sqrt(square / entries) / count
    if not math.isfinite(rms) or rms == 0.0:
        raise ValueError(
            f"the free factors' mean gradient has RMS {rms}: a gradient-scaled rate needs a "
            "finite, non-zero gradient; pass an absolute lr instead"
        )
    return rms


def gradient_scaled_rate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    gradient_lr: float,
    factor: str = "A",
    adapter_name: str = "default",
) -> float:
    """One learning rate for an adapter, from the pull of the task on its free factors:

    .. math:: \\eta = c / \\sqrt{g}

    with ``c = gradient_lr`` and ``g`` the RMS of the free factors' mean gradient at
    initialisation (:func:`free_factor_gradient_rms`). Cost: one forward and backward per
    batch.

    Raises:
        ValueError: ``gradient_lr`` is not a positive finite number, or as
            :func:`free_factor_gradient_rms`.
    """
    _check_positive("gradient_lr", gradient_lr)
    return gradient_lr / math.sqrt(free_factor_gradient_rms(model, batches, factor, adapter_name))
