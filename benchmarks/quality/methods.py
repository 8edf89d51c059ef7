"""The compared methods: each turns a fresh base model into (adapted model, optimizer, info).

All methods adapt the same target layers (default q, k, v, up, down) with r = 32, alpha = 64
(scaling 2), dropout 0.05 unless the method says otherwise, and see the same data in the same
order (the runner's job). Two learning-rate families: ``"adamw"`` (one lr for every trainable
parameter) and ``"stiefel"`` (lr for A and other parameters, ``stiefel_lr`` for B).

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
| fora_grad_init | Fisher top L/2 | B = top-r left sing. vectors of dL/dW | Stiefel B |
| fora_sampled | sampled-Fisher top L/2 | B orthonormal, A = 0 | Stiefel B |
| fora_module | per-module Fisher knapsack, <= L/2 budget | B orthonormal | Stiefel B |

The last three go beyond the paper (``docs/results.md`` says why each might beat FoRA).
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

from stiefel_peft.fisher import FisherScores, find_blocks
from stiefel_peft.fora import FoRAConfig, apply_fora, fora_optimizer, number_of_selected_blocks
from stiefel_peft.fora import select_top_blocks
from stiefel_peft.fora.targets import resolve_targets
from stiefel_peft.geometry import random_stiefel

__all__ = ["METHODS", "Method", "MethodContext", "build_method"]


@dataclass
class MethodContext:
    """What a method may use: calibration batches, the (shared) Fisher scores, hyperparameters."""

    calibration: list[dict[str, torch.Tensor]]
    fisher: FisherScores  # empirical Fisher of the base model on ``calibration``
    seed: int
    lr: float
    stiefel_lr: float | None = None
    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.05
    targets: tuple[str, ...] | None = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    budget: float = 0.5

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
            lr=self.lr,
            stiefel_lr=self.stiefel_lr or 1e-3,
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


def _per_block(model: nn.Module, context: MethodContext) -> dict[int, list[str]]:
    return resolve_targets(model, find_blocks(model), context.targets)[1]


def _half(model: nn.Module, context: MethodContext) -> int:
    return number_of_selected_blocks(find_blocks(model).length, context.budget)


def _peft_lora(
    model: nn.Module, names: list[str], r: int, alpha: float, dropout: float, dora: bool = False
) -> peft.PeftModel:
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=names,
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=dora,
    )
    return peft.get_peft_model(model, config)


def _adamw(model: nn.Module, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )


def _lora_on_blocks(
    blocks: Callable[[nn.Module, MethodContext], list[int]],
    rank_divisor: int = 1,
    dora: bool = False,
):
    def build(model: nn.Module, context: MethodContext):
        torch.manual_seed(context.seed)  # peft's Kaiming init of A
        per_block = _per_block(model, context)
        selected = sorted(blocks(model, context))
        names = [name for index in selected for name in per_block[index]]
        r, alpha = context.r // rank_divisor, context.alpha / rank_divisor  # same scaling alpha/r
        adapted = _peft_lora(model, names, r, alpha, context.dropout, dora)
        return (
            adapted,
            _adamw(adapted, context.lr),
            {"selected_blocks": selected, "r": r, "lora_alpha": alpha},
        )

    return build


def _all_blocks(model: nn.Module, context: MethodContext) -> list[int]:
    return list(range(find_blocks(model).length))


def _fisher_top(model: nn.Module, context: MethodContext) -> list[int]:
    return select_top_blocks(context.fisher.per_block, _half(model, context))


def _fisher_bottom(model: nn.Module, context: MethodContext) -> list[int]:
    negated = {index: -score for index, score in context.fisher.per_block.items()}
    return select_top_blocks(negated, _half(model, context))


def _random_half(model: nn.Module, context: MethodContext) -> list[int]:
    length = find_blocks(model).length
    return sorted(random.Random(context.seed).sample(range(length), _half(model, context)))


def _fora_like(budget: float, estimator: str = "empirical", optimizer: str = "stiefel"):
    def build(model: nn.Module, context: MethodContext):
        config = context.fora_config(budget=budget, estimator=estimator)
        adapted = apply_fora(model, calibration=context.calibration, config=config)
        report = adapted.fora_report
        info = {
            "selected_blocks": list(report.selected_blocks),
            "r": context.r,
            "lora_alpha": context.alpha,
            "fora_scoring_seconds": report.scoring_seconds,
            "fora_estimator": report.estimator,
        }
        if estimator == "empirical" and budget < 1:
            # apply_fora scored the same calibration batches itself: it must agree with the
            # runner's cached ranking, which the AdamW-on-selected-blocks methods use.
            info["matches_runner_fisher_top"] = info["selected_blocks"] == _fisher_top(
                model, context
            )
        if optimizer == "stiefel":
            return (
                adapted,
                fora_optimizer(adapted, lr=context.lr, stiefel_lr=context.stiefel_lr),
                info,
            )
        return adapted, _adamw(adapted, context.lr), info

    return build


@torch.no_grad()
def _set_b_to_gradient_frames(
    adapted: peft.PeftModel, calibration: list[dict[str, torch.Tensor]], r: int
) -> dict[str, Any]:
    """B <- top-r left singular vectors of G = dL/dW (base weight, summed over the calibration
    batches). With A = 0 the first steps move only A, along s B^T G; this B maximises
    ||B^T G||_F over orthonormal B (the first-order loss decrease). B stays on the manifold."""
    start = time.perf_counter()
    layers = [m for m in adapted.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    weights = [layer.get_base_layer().weight for layer in layers]
    for weight in weights:
        weight.requires_grad_(True)
        weight.grad = None
    try:
        with torch.enable_grad():
            for batch in calibration:
                adapted(**batch).loss.backward()
        for layer, weight in zip(layers, weights, strict=True):
            gradient = weight.grad.double()  # (d_out, d_in)
            frames, _, _ = torch.linalg.svd(
                gradient, full_matrices=False
            )  # (d_out, min(d_out, d_in))
            if frames.shape[1] < r:
                raise ValueError(
                    f"gradient init needs min(d_out, d_in) >= r={r}, got {tuple(gradient.shape)}"
                )
            layer.lora_B["default"].weight.copy_(frames[:, :r])
    finally:
        for weight in weights:
            weight.grad = None
            weight.requires_grad_(False)
        adapted.zero_grad(set_to_none=True)  # lora_A got s B^T G during the pass
    return {"gradient_init_seconds": time.perf_counter() - start}


def _fora_grad_init(model: nn.Module, context: MethodContext):
    adapted, optimizer, info = _fora_like(context.budget)(model, context)
    info.update(_set_b_to_gradient_frames(adapted, context.calibration, context.r))
    return adapted, optimizer, info


def _fora_module(model: nn.Module, context: MethodContext):
    """Per-module selection: rank every target layer of every block by its Fisher score per
    adapter parameter and add greedily while the total stays <= budget x LoRA-on-every-block."""
    modules = dict(model.named_modules())
    per_block = _per_block(model, context)
    names = [name for block in per_block.values() for name in block]
    cost = {
        name: context.r * (modules[name].in_features + modules[name].out_features) for name in names
    }
    limit = _half(model, context) / find_blocks(model).length * sum(cost.values())
    order = sorted(names, key=lambda name: (-context.fisher.per_module[name] / cost[name], name))
    chosen, used = [], 0
    for name in order:
        if used + cost[name] <= limit:
            chosen.append(name)
            used += cost[name]
    chosen = [name for name in names if name in set(chosen)]  # model order
    adapted = _peft_lora(model, chosen, context.r, context.alpha, context.dropout)
    generator = torch.Generator().manual_seed(context.seed)
    by_name = dict(adapted.base_model.model.named_modules())
    with torch.no_grad():
        for name in chosen:
            layer = by_name[name]
            weight_b = layer.lora_B["default"].weight  # (d_out, r)
            weight_b.copy_(
                random_stiefel(
                    weight_b.shape[0], context.r, dtype=torch.float64, generator=generator
                )
            )
            layer.lora_A["default"].weight.zero_()
    block_of = {name: index for index, block in per_block.items() for name in block}
    info = {
        "selected_blocks": sorted({block_of[name] for name in chosen}),
        "selected_modules": chosen,
        "r": context.r,
        "lora_alpha": context.alpha,
    }
    optimizer = fora_optimizer(
        adapted,
        lr=context.lr,
        stiefel_lr=context.stiefel_lr,
        stiefel_factor="B",
        retraction="cayley",
    )
    return adapted, optimizer, info


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
        Method("fora_grad_init", "stiefel", _fora_grad_init),
        Method("fora_sampled", "stiefel", _fora_like(0.5, estimator="sampled")),
        Method("fora_module", "stiefel", _fora_module),
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
