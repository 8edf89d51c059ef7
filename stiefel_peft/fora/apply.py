"""apply_fora: score -> plan -> inject -> initialise, with a report.

Each step is public (:mod:`stiefel_peft.fora.scoring`, :mod:`~stiefel_peft.fora.plan`,
:mod:`~stiefel_peft.fora.inject`, :mod:`~stiefel_peft.fora.initialise`); ``apply_fora`` is
their paper-default composition::

    plan = plan_fora(model, config)
    scores, data_free = score_blocks(model, calibration, config.estimator, ...)
    plan = select(plan, scores, config)      # config.selection: top_blocks, top_modules, ...
    model = inject_adapters(model, plan, config)
    initialise_adapters(model, plan, config, calibration)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import peft
from torch import nn

from stiefel_peft.distributed import default_process_group
from stiefel_peft.fora.config import FoRAConfig
from stiefel_peft.fora.initialise import initialise_adapters
from stiefel_peft.fora.inject import inject_adapters
from stiefel_peft.fora.plan import plan_fora
from stiefel_peft.fora.quantized import prepare_quantized
from stiefel_peft.fora.report import FoRAReport
from stiefel_peft.fora.scoring import score_blocks
from stiefel_peft.fora.selection import select
from stiefel_peft.fora.settings import attach_settings

__all__ = ["ADAPTER_NAME", "apply_fora"]

ADAPTER_NAME = "default"


def apply_fora(
    model: nn.Module,
    budget: float | None = None,
    *,
    calibration: Iterable[Mapping[str, Any]] | None = None,
    config: FoRAConfig | None = None,
    adapter_name: str = ADAPTER_NAME,
    progress: bool = False,
    process_group: Any = "auto",
    **overrides: Any,
) -> peft.PeftModel:
    """Put FoRA adapters on the most informative blocks of ``model``.

    1. Plan: find the repeated blocks (L of them) and the target layers in each.
    2. Score: rank the blocks by the Fisher score on ``calibration`` (``config.estimator``, at
       most ``config.calibration_batches`` batches); without calibration data, by the
       data-free fallback, with a warning. Nothing is scored when every block is kept.
    3. Select and inject: by default keep the top ``K = max(1, floor(L * budget))`` blocks
       (``config.selection`` names other rules at the same parameter budget) and put a plain
       peft LoRA adapter on their target layers (``LoraConfig.target_modules`` = the exact
       names).
    4. Initialise: ``config.init`` (default ``"orthonormal"``: the constrained factor a random
       orthonormal frame and the other zero, so the model's output is unchanged at first).

    Train with :func:`stiefel_peft.fora_optimizer`. ``model.save_pretrained(dir)`` writes a
    standard LoRA adapter that ``peft.PeftModel.from_pretrained`` loads with peft alone; the
    report is at ``model.fora_report`` (``model.fora_report.save(dir)`` writes
    ``fora_report.json``).

    Args:
        model: a transformers model built of ``nn.Linear`` (or ``Conv1D``) layers, or a
            ``PeftModel``: then the FoRA adapter is added beside its adapters (named
            ``adapter_name``), its blocks scored with the existing adapters disabled.
        budget: fraction of blocks in (0, 1]; when given it overrides ``config.budget``.
        calibration: an iterable of Hugging Face batches (``input_ids``, ``attention_mask``,
            ``labels``), as for :func:`stiefel_peft.estimate_fisher`.
        config: a :class:`FoRAConfig`; ``**overrides`` replace some of its fields.
        adapter_name: the peft adapter's name (``"default"``).
        progress: show a progress bar during scoring.
        process_group: where the Fisher scores are summed before the blocks are ranked.
            ``"auto"`` (default): the default (WORLD) group when ``torch.distributed`` is
            initialised with more than one process, so that every data-parallel rank, each
            with its own calibration shard, selects the same blocks; otherwise no reduction.
            A ``torch.distributed`` process group: sum over it. None: this process alone.

    Returns:
        The ``peft.PeftModel`` (``model`` is modified in place, as by peft).

    Raises:
        ValueError: a bad budget or config field, a taken adapter name, a model without a
            block list, targets that match nothing, or ``r`` larger than a constrained
            dimension.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(model, peft.PeftModel) and getattr(model, "peft_config", None):
        raise ValueError(
            "`model` carries peft adapters but is not a PeftModel (peft's add_adapter on a "
            "transformers model); pass the PeftModel, or the base model after unload()"
        )
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"`adapter_name` must be a non-empty string, got {adapter_name!r}")
    if isinstance(process_group, str) and process_group != "auto":
        raise ValueError(
            f"`process_group` must be 'auto', None or a torch.distributed process group, got "
            f"{process_group!r}"
        )
    config = config if config is not None else FoRAConfig()
    if budget is not None:
        overrides["budget"] = budget
    config = config.with_overrides(**overrides) if overrides else config
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    prepare_quantized(base)  # a 4-bit base must keep its gradients (QFoRA)
    plan = plan_fora(base, config)
    scores, data_free = None, False
    start = time.perf_counter()
    if plan.needs_scores:
        group = default_process_group() if process_group == "auto" else process_group
        if isinstance(model, peft.PeftModel):
            with model.disable_adapter():  # the base model's blocks, not its adapters'
                scores, data_free = _score(model, calibration, config, progress, group)
        else:
            scores, data_free = _score(model, calibration, config, progress, group)
        plan = select(plan, scores, config)  # block indices and names match under peft
    scoring_seconds = time.perf_counter() - start
    adapted = inject_adapters(model, plan, config, adapter_name)
    info = initialise_adapters(adapted, plan, config, calibration, adapter_name)
    extra = {"adapter_name": adapter_name, **info}
    report = FoRAReport.from_plan(plan, config, scores, data_free, scoring_seconds, extra=extra)
    attach_settings(adapted, adapter_name, config, report)  # also saved by save_pretrained
    return adapted


def _score(
    model: nn.Module,
    calibration: Iterable[Mapping[str, Any]] | None,
    config: FoRAConfig,
    progress: bool,
    group: Any,
) -> tuple[Any, bool]:
    return score_blocks(
        model,
        calibration,
        config.estimator,
        config.calibration_batches,
        config.seed,
        progress,
        process_group=group,
    )
