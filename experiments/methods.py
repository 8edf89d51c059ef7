"""The compared methods: each turns a fresh base model into (adapted model, optimizer, info).

All methods adapt the same target layers (default q, k, v, up, down) with r = 32, alpha = 64
(scaling 2), dropout 0.05 unless the method says otherwise, and see the same data in the same
order (the runner's job). Two learning-rate families: ``"adamw"`` (one lr for every trainable
parameter) and ``"stiefel"`` (lr for A and other parameters, ``stiefel_lr`` for B; or, with
``relative_lr``, A's rate ``relative_lr * RMS(W)`` per layer, ``FoRAConfig.relative_lr``; or,
with ``gradient_lr``, one rate ``gradient_lr / sqrt(g)`` for A, the head and, unless
``stiefel_lr`` is given, B, from the calibration batches' gradient of A at initialisation,
``experiments.rates.gradient_scaled_rate``; or, with ``estimated_lr``, A and any head at
``estimated_lr`` times a rate estimated while training, ``fora_optimizer(distance_estimate=True)``,
B at ``stiefel_lr``).

| method | blocks | init | optimiser |
|---|---|---|---|
| lora_r32_all | all | peft (A Kaiming, B = 0) | AdamW |
| lora_r16_all | all, r = 16, alpha = 32 | peft | AdamW |
| lora_r32_fisher_top | Fisher top L/2 | peft | AdamW |
| lora_r32_random_half | seeded random L/2 | peft | AdamW |
| lora_r32_bottom_half | Fisher bottom L/2 | peft | AdamW |
| lora_r32_all_orthoinit | all | B orthonormal, A = 0 (as FoRA) | AdamW (init control) |
| stiefel_b_all | all | B orthonormal, A = 0 | Stiefel B + AdamW A |
| fora | Fisher top L/2 | B orthonormal, A = 0 | Stiefel B + AdamW A |
| dora_r32_all | all | peft DoRA | AdamW |
| fora_grad_init | Fisher top L/2 | init="gradient" (B from dL/dW) | Stiefel B |
| fora_sampled | sampled-Fisher top L/2 | B orthonormal, A = 0 | Stiefel B |
| fora_module | ``top_modules``: layers by Fisher per parameter | B orthonormal | Stiefel B |
| fora_fisher_rank | ``fisher_rank``: all blocks, rank ~ score | B orthonormal | Stiefel B |
| fora_random_half | ``random_blocks``: seeded random L/2 | B orthonormal | Stiefel B |

The last four go beyond the paper (``docs/results.md`` says why each might beat FoRA); each is
a library option (``FoRAConfig.init``, ``.estimator``, ``.selection``), not code of its own here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peft
import torch
from torch import nn

from experiments.rates import gradient_scaled_rate
from stiefel_peft.fisher import FisherScores
from stiefel_peft.fora import (
    FoRAConfig,
    FoRAPlan,
    apply_fora,
    fora_optimizer,
    inject_adapters,
    plan_fora,
    select_top_blocks,
)

__all__ = ["METHODS", "Method", "MethodContext", "build_method"]

# The rate of every trainable parameter other than the free factors (a classifier head) when
# A's rate is weight-scaled: the library default when round2_*_weight_scaled ran, pinned here so
# that those configs re-run as recorded whatever the library default becomes.
WEIGHT_SCALED_OTHERS_LR = 5e-4


@dataclass
class MethodContext:
    """What a method may use: calibration batches, the (shared) Fisher scores, hyperparameters."""

    calibration: list[dict[str, torch.Tensor]]
    fisher: FisherScores  # empirical Fisher of the base model on ``calibration``
    seed: int
    lr: float | None
    stiefel_lr: float | None = None
    relative_lr: float | None = None
    gradient_lr: float | None = None
    estimated_lr: float | None = None
    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.05
    targets: tuple[str, ...] | None = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    budget: float = 0.5
    modules_to_save: tuple[str, ...] | None = None  # trained in full: a new classifier head

    @property
    def others_lr(self) -> float:
        """The rate of A (when absolute) and of any other trainable parameter (a head): ``lr``,
        or, when A's rate is weight- or gradient-scaled (``lr`` None), the pinned
        :data:`WEIGHT_SCALED_OTHERS_LR`."""
        return self.lr if self.lr is not None else WEIGHT_SCALED_OTHERS_LR

    def fora_config(self, **overrides: Any) -> FoRAConfig:
        settings = dict(
            budget=self.budget,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.targets,
            estimator="empirical",
            calibration_batches=None,
            seed=self.seed,
            stiefel_lr=self.stiefel_lr or FoRAConfig().stiefel_lr,
            relative_lr=self.relative_lr,
            modules_to_save=self.modules_to_save,
            lr=self.others_lr,
        )
        settings.update(overrides)
        return FoRAConfig(**settings)


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "adamw" or "stiefel"
    build: Callable[
        [nn.Module, MethodContext], tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]
    ]


def _plan(model: nn.Module, context: MethodContext, **overrides: Any) -> FoRAPlan:
    return plan_fora(model, context.fora_config(**overrides))


def _adamw(model: nn.Module, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )


def _lora_on_blocks(
    blocks: Callable[[FoRAPlan, MethodContext], list[int]],
    rank_divisor: int = 1,
    dora: bool = False,
):
    """peft LoRA (its own init: A Kaiming, B = 0) on the chosen blocks, trained by AdamW."""

    def build(model: nn.Module, context: MethodContext):
        torch.manual_seed(context.seed)  # peft's Kaiming init of A
        r, alpha = context.r // rank_divisor, context.alpha / rank_divisor  # same scaling alpha/r
        plan = _plan(model, context)
        plan = plan.with_blocks(blocks(plan, context))
        if dora:
            settings = peft.LoraConfig(
                r=r, lora_alpha=alpha, lora_dropout=context.dropout,
                target_modules=list(plan.adapted_modules), bias="none", task_type="CAUSAL_LM",
                use_dora=True,
            )  # fmt: skip
            adapted = peft.get_peft_model(model, settings)
        else:
            config = context.fora_config(r=r, lora_alpha=alpha, init="peft")
            adapted = inject_adapters(model, plan, config)
        info = {"selected_blocks": list(plan.selected_blocks), "r": r, "lora_alpha": alpha}
        return adapted, _adamw(adapted, context.lr), info

    return build


def _all_blocks(plan: FoRAPlan, context: MethodContext) -> list[int]:
    return list(range(plan.blocks.length))


def _fisher_top(plan: FoRAPlan, context: MethodContext) -> list[int]:
    return select_top_blocks(context.fisher.per_block, plan.count)


def _fisher_bottom(plan: FoRAPlan, context: MethodContext) -> list[int]:
    negated = {index: -score for index, score in context.fisher.per_block.items()}
    return select_top_blocks(negated, plan.count)


def _random_half(plan: FoRAPlan, context: MethodContext) -> list[int]:
    return sorted(random.Random(context.seed).sample(range(plan.blocks.length), plan.count))


def _fora_like(
    budget: float,
    estimator: str = "empirical",
    optimizer: str = "stiefel",
    init: str = "orthonormal",
    selection: str = "top_blocks",
):
    def build(model: nn.Module, context: MethodContext):
        start = time.perf_counter()
        config = context.fora_config(
            budget=budget, estimator=estimator, init=init, selection=selection
        )
        adapted = apply_fora(model, calibration=context.calibration, config=config)
        report = adapted.fora_report
        info = {
            "selected_blocks": list(report.selected_blocks),
            "r": context.r,
            "lora_alpha": context.alpha,
            "fora_scoring_seconds": report.scoring_seconds,
            "fora_estimator": report.estimator,
            "selected_modules": list(report.adapted_modules),
            "ranks": report.ranks,
            "build_seconds": time.perf_counter() - start,
        }
        if estimator == "empirical" and budget < 1 and selection == "top_blocks":
            # apply_fora scored the same calibration batches itself: it must agree with the
            # runner's cached ranking, which the AdamW-on-selected-blocks methods use.
            plan = _plan(model, context)  # the adapters are inside model now: same blocks
            info["matches_runner_fisher_top"] = info["selected_blocks"] == _fisher_top(
                plan, context
            )
        lr, stiefel_lr = context.others_lr, context.stiefel_lr  # A's own when rates are absolute
        if context.gradient_lr is not None:  # one rate from A's gradient at initialisation
            lr = gradient_scaled_rate(adapted, context.calibration, context.gradient_lr)
            stiefel_lr = stiefel_lr or lr
            info["gradient_rate"] = lr
        estimated = context.estimated_lr is not None  # lr: the multiplier of the estimate
        if optimizer == "stiefel":
            stiefel = fora_optimizer(
                adapted,
                lr=context.estimated_lr if estimated else lr,
                stiefel_lr=stiefel_lr,
                relative_lr=context.relative_lr,
                distance_estimate=estimated,
            )
            if context.relative_lr is not None:  # the rates the weights gave each layer's A
                rates = [
                    group["lr"]
                    for group in stiefel.param_groups[1:]
                    if all(".lora_" in name for name in group["param_names"])
                ]  # not the group of a classifier head
                info["free_factor_lr"] = {
                    "min": min(rates), "mean": sum(rates) / len(rates), "max": max(rates),
                }  # fmt: skip
            return adapted, stiefel, info
        return adapted, _adamw(adapted, lr), info

    return build


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("lora_r32_all", "adamw", _lora_on_blocks(_all_blocks)),
        Method("lora_r16_all", "adamw", _lora_on_blocks(_all_blocks, rank_divisor=2)),
        Method("lora_r32_fisher_top", "adamw", _lora_on_blocks(_fisher_top)),
        Method("lora_r32_random_half", "adamw", _lora_on_blocks(_random_half)),
        Method("lora_r32_bottom_half", "adamw", _lora_on_blocks(_fisher_bottom)),
        Method("lora_r32_all_orthoinit", "adamw", _fora_like(1.0, optimizer="adamw")),
        Method("stiefel_b_all", "stiefel", _fora_like(1.0)),
        Method("fora", "stiefel", _fora_like(0.5)),
        Method("dora_r32_all", "adamw", _lora_on_blocks(_all_blocks, dora=True)),
        Method("fora_grad_init", "stiefel", _fora_like(0.5, init="gradient")),
        Method("fora_sampled", "stiefel", _fora_like(0.5, estimator="sampled")),
        Method("fora_module", "stiefel", _fora_like(0.5, selection="top_modules")),
        Method("fora_fisher_rank", "stiefel", _fora_like(0.5, selection="fisher_rank")),
        Method("fora_random_half", "stiefel", _fora_like(0.5, selection="random_blocks")),
    )
}


def build_method(
    name: str, model: nn.Module, context: MethodContext
) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """Adapt ``model`` (modified in place) with method ``name``; return model, optimizer, info.

    Raises:
        ValueError: an unknown method name.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    adapted, optimizer, info = METHODS[name].build(model, context)
    info["trainable_parameters"] = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    info["family"] = METHODS[name].family
    return adapted, optimizer, info
