"""apply_fora: Fisher-selected blocks, plain peft LoRA adapters, one Stiefel-constrained factor."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import peft
import torch
from torch import nn

from stiefel_peft.distributed import default_process_group
from stiefel_peft.fisher import find_blocks
from stiefel_peft.fora.config import FoRAConfig, number_of_selected_blocks
from stiefel_peft.fora.report import FoRAReport
from stiefel_peft.fora.select import score_blocks, select_top_blocks
from stiefel_peft.fora.targets import resolve_targets
from stiefel_peft.geometry import random_stiefel

__all__ = ["ADAPTER_NAME", "apply_fora"]

ADAPTER_NAME = "default"


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"  # peft then trains and saves the new classifier head too
    return None


def _lora_parameters(linear: nn.Linear, r: int) -> int:
    return r * (linear.in_features + linear.out_features)


@torch.no_grad()
def _initialise(model: peft.PeftModel, adapted: list[str], config: FoRAConfig) -> None:
    # Constrained factor: a Haar-random orthonormal frame (seeded, drawn in float64 on the CPU
    # so every device and dtype gets the same frame); the other factor zero, so B A = 0 and
    # the adapted model starts exactly as the base model.
    generator = torch.Generator().manual_seed(config.seed)
    by_name = dict(model.base_model.model.named_modules())
    for name in adapted:
        layer = by_name[name]
        lora_a = layer.lora_A[ADAPTER_NAME].weight  # (r, d_in)
        lora_b = layer.lora_B[ADAPTER_NAME].weight  # (d_out, r)
        if config.stiefel_factor == "B":
            frame = random_stiefel(
                lora_b.shape[0], config.r, dtype=torch.float64, generator=generator
            )
            lora_b.copy_(frame)
            lora_a.zero_()
        else:
            frame = random_stiefel(
                lora_a.shape[1], config.r, dtype=torch.float64, generator=generator
            )
            lora_a.copy_(frame.mT)  # rows orthonormal
            lora_b.zero_()


def _check_rank(
    per_block: dict[int, list[str]], modules: dict[str, nn.Module], config: FoRAConfig
) -> None:
    names = [name for names in per_block.values() for name in names]
    attribute = "out_features" if config.stiefel_factor == "B" else "in_features"
    smallest = min(names, key=lambda name: getattr(modules[name], attribute))
    size = getattr(modules[smallest], attribute)
    if config.r > size:
        factor = "lora_B (d_out x r)" if config.stiefel_factor == "B" else "lora_A (r x d_in)"
        raise ValueError(
            f"`r`={config.r} is larger than {attribute}={size} of {smallest!r}: {factor} cannot "
            f"have {config.r} orthonormal {'columns' if config.stiefel_factor == 'B' else 'rows'}; "
            f"use r <= {size} or drop that module from target_modules"
        )


def apply_fora(
    model: nn.Module,
    budget: float | None = None,
    *,
    calibration: Iterable[Mapping[str, Any]] | None = None,
    config: FoRAConfig | None = None,
    progress: bool = False,
    process_group: Any = "auto",
    **overrides: Any,
) -> peft.PeftModel:
    """Put FoRA adapters on the most informative blocks of ``model``.

    1. Find the repeated blocks (L of them) and the target linear layers in each.
    2. Rank the blocks by the Fisher score on ``calibration`` (``config.estimator``, at most
       ``config.calibration_batches`` batches); without calibration data, rank them by the
       data-free fallback and warn. Nothing is scored when every block is kept (budget 1).
    3. Keep the top ``K = max(1, floor(L * budget))`` blocks and inject a plain peft LoRA
       adapter into their target layers (``LoraConfig.target_modules`` = the exact names).
    4. Initialise the constrained factor (``lora_B`` by default) as a random orthonormal frame
       and the other factor as zero: the model's output is unchanged at first.

    Train with :func:`stiefel_peft.fora_optimizer`. ``model.save_pretrained(dir)`` writes a
    standard LoRA adapter that ``peft.PeftModel.from_pretrained`` loads with peft alone; the
    report is at ``model.fora_report`` (``model.fora_report.save(dir)`` writes
    ``fora_report.json``).

    Args:
        model: a transformers model built of ``nn.Linear`` layers (not yet a ``PeftModel``).
        budget: fraction of blocks in (0, 1]; when given it overrides ``config.budget``
            (default 0.5).
        calibration: an iterable of Hugging Face batches (``input_ids``, ``attention_mask``,
            ``labels``), as for :func:`stiefel_peft.estimate_fisher`.
        config: a :class:`FoRAConfig`; ``**overrides`` replace some of its fields.
        progress: show a progress bar during scoring.
        process_group: where the Fisher scores are summed before the blocks are ranked.
            ``"auto"`` (default): the default (WORLD) group when ``torch.distributed`` is
            initialised with more than one process, so that every data-parallel rank, each
            with its own calibration shard, selects the same blocks (those of the union of
            the shards); otherwise no reduction. A ``torch.distributed`` process group: sum
            over it. None: score this process's batches alone.

    Returns:
        The ``peft.PeftModel`` wrapping ``model`` (which is modified in place, as by peft).

    Raises:
        ValueError: a bad budget or config field, a model that already has peft adapters, a
            model without a block list, target modules that match nothing, or ``r`` larger
            than a constrained dimension.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, peft.PeftModel) or getattr(model, "peft_config", None):
        raise ValueError(
            "`model` already carries peft adapters; pass the base model (e.g. "
            "`model.get_base_model()` after `unload()`), not a PeftModel"
        )
    if isinstance(process_group, str) and process_group != "auto":
        raise ValueError(
            f"`process_group` must be 'auto', None or a torch.distributed process group, got "
            f"{process_group!r}"
        )
    config = config if config is not None else FoRAConfig()
    if budget is not None:
        overrides["budget"] = budget
    config = config.with_overrides(**overrides) if overrides else config
    blocks = find_blocks(model)
    patterns, per_block = resolve_targets(model, blocks, config.target_modules)
    modules = dict(model.named_modules())
    _check_rank(per_block, modules, config)
    count = number_of_selected_blocks(blocks.length, config.budget)

    scores = None
    data_free = False
    start = time.perf_counter()
    if count < blocks.length:
        group = default_process_group() if process_group == "auto" else process_group
        scores, data_free = score_blocks(
            model,
            calibration,
            config.estimator,
            config.calibration_batches,
            config.seed,
            progress,
            process_group=group,
        )
        selected = select_top_blocks(scores.per_block, count)
    else:
        selected = list(range(blocks.length))
    scoring_seconds = time.perf_counter() - start

    adapted = [name for index in selected for name in per_block[index]]
    lora_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=adapted,
        bias="none",
        task_type=_task_type(model),
    )
    adapter_parameters = sum(_lora_parameters(modules[name], config.r) for name in adapted)
    equivalent = sum(
        _lora_parameters(modules[name], config.r) for names in per_block.values() for name in names
    )
    peft_model = peft.get_peft_model(model, lora_config, adapter_name=ADAPTER_NAME)
    _initialise(peft_model, adapted, config)

    peft_model.fora_config = config
    peft_model.fora_report = FoRAReport(
        budget=config.budget,
        num_blocks=blocks.length,
        selected_blocks=selected,
        per_block_scores=dict(scores.per_block) if scores is not None else None,
        estimator=("sampled" if data_free else config.estimator) if scores is not None else None,
        data_free=data_free,
        target_modules=list(patterns),
        adapted_modules=adapted,
        stiefel_factor=config.stiefel_factor,
        retraction=config.retraction,
        r=config.r,
        lora_alpha=config.lora_alpha,
        adapter_parameters=adapter_parameters,
        lora_equivalent_parameters=equivalent,
        parameter_ratio=adapter_parameters / equivalent,
        scoring_seconds=scoring_seconds,
        calibration_examples=scores.num_examples if scores is not None else 0,
    )
    return peft_model
