"""A gradient-scaled learning rate for FoRA's free factor: a rate rule tested in the quality
study (docs/results.md, item 3), kept here with the study because it failed its test.

Adam moves the free factor ``A`` by about its rate per entry whatever the gradient's scale, so a
fixed rate ignores how strongly the task pulls on the adapter. The rule reads that pull once,
at initialisation (``A = 0``, ``B`` orthonormal), as the RMS ``g`` of the free factors' mean
gradient over the calibration batches, and gives ``A``, ``B`` and any head the one rate

    lr = c / sqrt(g).

On the four causal-LM cells of the study ``g`` falls in the order of their best tied rates
(best x sqrt(g) within 6.7e-5..1.0e-4), which fixed ``c = 9e-5``. Out of sample it failed: the
all-MiniLM-L6-v2 classifier, whose new random head passes little gradient back at
initialisation, got ``g`` ~ 5e-5 and a rate of 1.3e-2, at which it collapsed to the majority
class on every seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from stiefel_peft.fora import constrained_parameters

__all__ = ["free_factor_gradient_rms", "gradient_scaled_rate"]


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
    parameters = [p for _, p in constrained_parameters(model, factor, adapter_name)]
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
