"""The inject step of FoRA: plain peft LoRA adapters on exactly the planned layers.

A FoRA adapter is a standard LoRA adapter (peft cannot register a new method type): its
``LoraConfig.target_modules`` lists the exact names of the adapted layers, so
``save_pretrained`` writes an adapter that peft alone reloads, merges and serves. On a model
that already is a ``PeftModel`` the adapter is added beside the others (``add_adapter``).
"""

from __future__ import annotations

import re

import peft
from torch import nn

from stiefel_peft.fora.config import FoRAConfig
from stiefel_peft.fora.plan import FoRAPlan

__all__ = ["base_model_of", "inject_adapters", "lora_config", "task_type"]


def task_type(model: nn.Module) -> str | None:
    """peft's task type for a transformers model: causal LM, sequence classification, or None."""
    name = type(base_model_of(model)).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"  # peft then trains and saves the new classifier head too
    return None


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (or ``model`` itself)."""
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def lora_config(model: nn.Module, plan: FoRAPlan, config: FoRAConfig) -> peft.LoraConfig:
    """The ``peft.LoraConfig`` of the adapter: the planned layers, r, alpha, dropout and the
    LoRA settings ``config`` passes through (``bias``, ``use_rslora``, ``modules_to_save``).

    Raises:
        ValueError: the plan selects nothing.
    """
    if not plan.adapted_modules:
        raise ValueError(
            "the plan adapts no layer: select blocks first (plan.select_top(scores), "
            "plan.with_blocks(...) or plan.with_modules(...))"
        )
    # Layers at their own rank keep the scaling alpha / r of the others (alpha_l = alpha r_l / r).
    ranks = {f"^{re.escape(name)}$": rank for name, rank in plan.ranks.items()}
    alphas = {
        f"^{re.escape(name)}$": config.lora_alpha * rank / config.r
        for name, rank in plan.ranks.items()
    }
    return peft.LoraConfig(
        r=config.r,
        rank_pattern=ranks,
        alpha_pattern=alphas,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(plan.adapted_modules),
        bias=config.bias,
        use_rslora=config.use_rslora,
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        task_type=task_type(model),
    )


def inject_adapters(
    model: nn.Module, plan: FoRAPlan, config: FoRAConfig, adapter_name: str = "default"
) -> peft.PeftModel:
    """Put a LoRA adapter named ``adapter_name`` on the plan's layers of ``model``.

    A plain transformers model is wrapped by ``peft.get_peft_model`` (modified in place, as by
    peft); a ``PeftModel`` gets the adapter beside its others (``add_adapter``; the active
    adapter is switched to the new one, as ``set_adapter`` does). The factors keep peft's
    initialisation until :func:`~stiefel_peft.fora.initialise.initialise_adapters`.

    Raises:
        ValueError: the name is taken, or the plan selects nothing.
    """
    settings = lora_config(model, plan, config)
    if isinstance(model, peft.PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(
                f"`adapter_name` {adapter_name!r} is taken (adapters: "
                f"{sorted(model.peft_config)}); pass another name"
            )
        model.add_adapter(adapter_name, settings)
        model.set_adapter(adapter_name)
        return model
    return peft.get_peft_model(model, settings, adapter_name=adapter_name)
