"""The causal-LM training loss, projecting only the supervised positions onto the vocabulary.

A Hugging Face causal LM computes ``lm_head`` (``hidden x vocabulary`` per position) for every
position of the batch, although the loss of a prompt/answer example only reads the positions
that predict an answer token. On a large vocabulary this projection dominates the step: for
Gemma-3-270M (262k tokens, hidden 640) it is ~168M multiply-adds per position against ~100M for
all 18 blocks. :func:`supervised_loss` keeps only the columns ``t`` where some row supervises
token ``t + 1`` (``logits_to_keep`` as an index tensor), which is the same loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "accepts_logits_to_keep", "supervised_logits", "supervised_loss"]

IGNORE_INDEX = -100


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (DDP- and peft-unwrapped) model's forward takes ``logits_to_keep`` (HF
    causal LMs)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def supervised_logits(model: torch.nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The logits at the supervised columns and their targets: ``(B, C, V)`` and ``(B, C)``.

    ``C = {t : some row supervises token t + 1}``; only those columns are projected onto the
    vocabulary (``logits_to_keep`` as an index tensor, cost ``B |C| h V`` instead of
    ``B T h V``). Targets are ``labels[:, t + 1]`` (``-100`` where that row supervises
    nothing). A model whose forward has no ``logits_to_keep`` gets the full projection,
    then the columns are indexed (same values). Logits keep the model's dtype.

    Args:
        model: a causal LM (or a peft model around one) taking ``input_ids``,
            ``attention_mask`` and returning ``.logits`` of shape ``(B, T, V)``.
        batch: ``input_ids`` and ``labels`` ``(B, T)`` long, ``attention_mask`` optional;
            ``labels`` use ``-100`` for unsupervised positions, unshifted (HF convention).

    Raises:
        ValueError: ``labels`` missing, shaped unlike ``input_ids``, or with no supervised token
            after the first column.
    """
    if "labels" not in batch:
        raise ValueError("batch needs 'labels' (B, T) with -100 where nothing is supervised")
    input_ids, labels = batch["input_ids"], batch["labels"]
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the shape of input_ids "
            f"{tuple(input_ids.shape)}"
        )
    targets = labels[:, 1:]  # column t predicts token t + 1
    columns = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (C,)
    if columns.numel() == 0:
        raise ValueError("labels supervise no token after the first column; nothing to learn")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=columns).logits  # (B, C, V)
    else:
        logits = model(**inputs).logits[:, columns]
    return logits, targets[:, columns]


def supervised_loss(
    model: torch.nn.Module, batch: Mapping[str, Tensor], reduction: str = "mean"
) -> Tensor:
    """Mean next-token cross entropy over the supervised tokens, as ``model(**batch).loss``.

    .. math:: L = \\frac{1}{|S|} \\sum_{(b, t) \\in S} -\\log p(y_{b, t+1} \\mid x_{b, \\le t}),
              \\quad S = \\{(b, t) : y_{b, t+1} \\ne -100\\}

    The logits come from :func:`supervised_logits` (only the supervised columns are projected
    onto the vocabulary) and are upcast to float32 for the loss.

    With ``reduction="sum"`` the sum over ``S`` instead (the trainer divides the sums of a
    step's micro-batches by the step's token count, which makes gradient accumulation and data
    parallelism give the gradient of one large batch).

    Args:
        model: as :func:`supervised_logits`.
        batch: as :func:`supervised_logits`.
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        A scalar tensor (float32, or the logits' dtype if wider) with the autograd graph.

    Raises:
        ValueError: as :func:`supervised_logits`, or an unknown ``reduction``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"`reduction` must be 'mean' or 'sum', got {reduction!r}")
    logits, targets = supervised_logits(model, batch)  # (B, C, V), (B, C)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
