"""The score step of FoRA: the Fisher pass on calibration data, or the data-free fallback."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from stiefel_peft.fisher import FisherScores, estimate_fisher
from stiefel_peft.fisher.losses import CAUSAL_LM, head_kind

__all__ = ["DATA_FREE_BATCHES", "data_free_batches", "score_blocks"]

DATA_FREE_BATCHES = 4
DATA_FREE_BATCH_SIZE = 4
DATA_FREE_SEQUENCE_LENGTH = 32


def data_free_batches(model: nn.Module, seed: int) -> list[dict[str, torch.Tensor]]:
    """Uniformly random token sequences for the data-free fallback.

    With no task data, the blocks are ranked by the sampled ("true") Fisher of the model on
    random tokens, labels drawn from its own predictive distribution: a property of the model
    alone. Task data gives a task-informed ranking and should be preferred.

    Raises:
        ValueError: if the model's config has no ``vocab_size``.
    """
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(
            "the data-free fallback needs model.config.vocab_size; pass calibration=[batches]"
        )
    device = next(model.parameters()).device
    causal = head_kind(model, None) == CAUSAL_LM  # classifiers sample their labels unseen
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(DATA_FREE_BATCHES):
        ids = torch.randint(
            vocab_size, (DATA_FREE_BATCH_SIZE, DATA_FREE_SEQUENCE_LENGTH), generator=generator
        )
        batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        if causal:
            batch["labels"] = ids.to(device)  # positions to sample at; the values are redrawn
        batches.append(batch)
    return batches


def score_blocks(
    model: nn.Module,
    calibration: Iterable[Mapping[str, Any]] | None,
    estimator: str,
    max_batches: int | None,
    seed: int,
    progress: bool = False,
    process_group: Any = None,
) -> tuple[FisherScores, bool]:
    """Fisher scores for ranking, and whether the data-free fallback produced them.

    ``process_group`` (a ``torch.distributed`` process group, or None) is passed to
    :func:`~stiefel_peft.fisher.estimate_fisher`: the scores are then those of the union of
    the processes' calibration batches, identical on every process.

    Warns:
        UserWarning: when ``calibration`` is None (the data-free fallback is used).
    """
    if calibration is None:
        warnings.warn(
            "apply_fora got no calibration data: blocks are ranked by the data-free fallback "
            "(sampled Fisher on random tokens). Pass calibration=[batches of your task] for a "
            "task-informed selection.",
            UserWarning,
            stacklevel=3,
        )
        batches = data_free_batches(model, seed)
        scores = estimate_fisher(
            model, batches, "sampled", seed=seed, progress=progress, process_group=process_group
        )
        return scores, True
    scores = estimate_fisher(
        model,
        calibration,
        estimator,
        seed=seed,
        max_batches=max_batches,
        progress=progress,
        process_group=process_group,
    )
    return scores, False
