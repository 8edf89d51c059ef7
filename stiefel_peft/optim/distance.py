"""Adam with an estimated step size: Prodigy's distance estimate for Euclidean groups.

A rate for a factor that starts at zero (FoRA's ``lora_A``) decides how far it gets in a
schedule, and the quality study (docs/results.md, item 3) found the best fixed rate 16 times
apart between tasks. Prodigy (Mishchenko and Defazio 2023, "Prodigy: An Expeditiously Adaptive
Parameter-Free Learner", Algorithm 4) replaces the rate by a running lower bound ``d`` on the
distance from the start ``x0`` to a solution, read from the iterates and their gradients. With a
schedule multiplier ``gamma_k`` (the group's ``lr``, usually 1.0 times a schedule), per step:

    m    <- beta1 m + (1 - beta1) d g
    v    <- beta2 v + (1 - beta2) d^2 g^2
    r    <- sqrt(beta2) r + (1 - sqrt(beta2)) gamma_k d^2 <g, x0 - x>
    s    <- sqrt(beta2) s + (1 - sqrt(beta2)) gamma_k d^2 g
    x    <- x - gamma_k d lambda x - gamma_k d c_k m / (sqrt(v) + d eps)
    d    <- max(d, r / ||s||_1)

with ``c_k = sqrt(1 - beta2^k) / (1 - beta1^k)`` (Adam's bias correction, kept so that ``d`` is
the rate an Adam with the same schedule would have: about the step of each entry), decoupled
weight decay ``lambda``, and the inner product and ``||s||_1`` summed over every parameter of
the group (one ``d`` per group). The step uses the ``d`` of the step before. ``d`` never
decreases; it starts at ``initial_distance``. With zero gradients ``||s||_1 = 0`` and ``d`` is
kept.

Cost: O(N) per step for N entries in the group, plus two extra buffers the size of the
parameters (``x0`` and ``s``); one host synchronisation per group and step (the new ``d`` is
read back as a Python float so that it lives in the param group and round-trips through
``state_dict``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["DistanceState", "distance_adam_step"]


class DistanceState:
    """The group-wide scalars of the estimate: ``distance`` (d) and ``numerator`` (r)."""

    __slots__ = ("distance", "numerator")

    def __init__(self, distance: float, numerator: float = 0.0) -> None:
        self.distance = distance
        self.numerator = numerator


def distance_adam_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    initials: list[torch.Tensor],
    gradient_sums: list[torch.Tensor],
    estimate: DistanceState,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One in-place step of every parameter of a group, and the update of ``estimate``.

    Args:
        params: the group's parameters with a gradient (any shapes, floating dtypes).
        grads: their gradients (read, never changed).
        exp_avgs, exp_avg_sqs: Adam's moments ``m`` and ``v``, one per parameter, same shape.
        initials: ``x0``, each parameter's value at its first step.
        gradient_sums: ``s``, the weighted running gradient sums of the estimate.
        estimate: the group's ``d`` and ``r``, updated in place.
        step: the step number k >= 1 (for the bias correction).
        lr: the schedule multiplier ``gamma_k`` (1.0 is Prodigy's own value).
        beta1, beta2: Adam's decay rates, in [0, 1).
        eps: added to ``sqrt(v)`` in units of ``d``.
        weight_decay: decoupled decay, applied at the rate ``gamma_k d``.
        maximize: ascend instead of descend.

    Raises:
        ValueError: ``step`` is below 1.
    """
    if step < 1:
        raise ValueError(f"`step` must be >= 1, got {step}")
    distance = estimate.distance
    root = math.sqrt(beta2)
    weight = lr * distance * distance
    correction = math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    rate = lr * distance
    products: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    for param, grad, exp_avg, exp_avg_sq, initial, gradient_sum in zip(
        params, grads, exp_avgs, exp_avg_sqs, initials, gradient_sums, strict=True
    ):
        gradient = -grad if maximize else grad
        products.append(torch.sum(gradient * (initial - param), dtype=torch.float64))
        gradient_sum.mul_(root).add_(gradient, alpha=(1.0 - root) * weight)
        norms.append(gradient_sum.abs().sum(dtype=torch.float64))
        exp_avg.mul_(beta1).add_(gradient, alpha=(1.0 - beta1) * distance)
        exp_avg_sq.mul_(beta2).addcmul_(gradient, gradient, value=(1.0 - beta2) * distance**2)
        if weight_decay != 0:
            param.mul_(1.0 - rate * weight_decay)
        denominator = exp_avg_sq.sqrt().add_(distance * eps)
        param.addcdiv_(exp_avg, denominator, value=-rate * correction)
    sums = torch.stack([torch.stack(products).sum(), torch.stack(norms).sum()]).tolist()
    estimate.numerator = root * estimate.numerator + (1.0 - root) * weight * sums[0]
    if sums[1] > 0.0:
        estimate.distance = max(distance, estimate.numerator / sums[1])
