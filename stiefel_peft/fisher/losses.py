"""Per-example losses of Hugging Face heads, and labels sampled from the model's predictions.

``model(**batch).loss`` averages over the batch; the Fisher estimators need each example's own
loss ``loss_n``, the value ``model(**example_n).loss`` would give:

- causal LM (``ForCausalLMLoss``): labels shifted left by one, -100 ignored, and
  ``loss_n = (1/|V_n|) sum_{t in V_n} CE(logits_{n,t}, labels_{n,t+1})`` over the example's
  own labelled positions ``V_n``; an example with ``|V_n| = 0`` has no loss (NaN alone) and is
  left out of the estimate;
- sequence classification (``problem_type`` as Hugging Face infers it):
  single-label ``CE(logits_n, y_n)``, regression ``mean_k (logits_{n,k} - y_{n,k})^2``,
  multi-label ``mean_k BCEWithLogits(logits_{n,k}, y_{n,k})``.

Every other head is ``"unknown"``: the estimators then run one forward/backward per example on
the model's own loss (exact, slower). The batched path is also checked on every batch: the
per-example losses, recombined as the model reduces them, must reproduce ``model(**batch).loss``
(:func:`check_against_batch_loss`), so a model whose loss is not the standard one raises
instead of returning a wrong answer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CAUSAL_LM",
    "HEAD_KINDS",
    "IGNORE_INDEX",
    "UNKNOWN",
    "check_against_batch_loss",
    "head_kind",
    "per_example_losses",
    "sample_labels",
]

CAUSAL_LM = "causal_lm"
SINGLE_LABEL = "single_label_classification"
REGRESSION = "regression"
MULTI_LABEL = "multi_label_classification"
UNKNOWN = "unknown"
HEAD_KINDS = (CAUSAL_LM, SINGLE_LABEL, REGRESSION, MULTI_LABEL, UNKNOWN)
IGNORE_INDEX = -100


def _unwrap(model: nn.Module) -> nn.Module:
    get_base_model = getattr(model, "get_base_model", None)  # peft.PeftModel
    return get_base_model() if callable(get_base_model) else model


def head_kind(model: nn.Module, labels: torch.Tensor | None) -> str:
    """Which loss the model's head computes: one of :data:`HEAD_KINDS`.

    Causal LMs are recognised by a class name ending in ``ForCausalLM`` (or ``LMHeadModel``,
    the GPT-2 family) whose ``loss_type`` is ``"ForCausalLM"`` or unset; sequence classifiers
    by a name ending in ``ForSequenceClassification``, with the problem type resolved as in
    Hugging Face (``config.problem_type``, else regression for one label, single-label for
    integer labels or no labels, multi-label otherwise).
    """
    base = _unwrap(model)
    name = type(base).__name__
    config = getattr(base, "config", None)
    causal = name.endswith("ForCausalLM") or name.endswith("LMHeadModel")  # GPT-2 family
    if causal and getattr(base, "loss_type", None) in (None, "ForCausalLM"):
        return CAUSAL_LM
    if name.endswith("ForSequenceClassification") and config is not None:
        problem = getattr(config, "problem_type", None)
        if problem in (SINGLE_LABEL, REGRESSION, MULTI_LABEL):
            return problem
        if getattr(config, "num_labels", 0) == 1:
            return REGRESSION
        if labels is None or labels.dtype in (torch.long, torch.int):
            return SINGLE_LABEL  # without labels (sampled Fisher): a categorical head
        if labels is not None:
            return MULTI_LABEL
    return UNKNOWN


def per_example_losses(
    kind: str, logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(losses, weights)``: each example's own loss and its weight in the batch mean.

    Args:
        kind: a head kind other than ``"unknown"``.
        logits: ``(B, T, V)`` for a causal LM, ``(B, C)`` for sequence classification.
        labels: ``(B, T)`` token ids with -100 ignored, or ``(B,)`` / ``(B, C)`` targets.

    Returns:
        ``losses`` ``(B,)`` in float32 (float64 for float64 logits), 0 where an example has no
        labelled token; ``weights`` ``(B,)``: the number of labelled tokens (causal LM) or 1,
        so that ``sum(weights * losses) / sum(weights)`` is the batch loss.

    Raises:
        ValueError: for ``kind="unknown"`` or an unknown kind.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype)
    if kind == CAUSAL_LM:
        batch, tokens, vocab = logits.shape
        # shift the labels, not the logits: no (B, T-1, V) copy
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
        token_losses = F.cross_entropy(
            logits.reshape(batch * tokens, vocab),
            shifted.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(batch, tokens)  # (B, T), 0 where ignored
        counts = (shifted != IGNORE_INDEX).sum(dim=1)  # (B,)
        return token_losses.sum(dim=1) / counts.clamp(min=1).to(dtype), counts.to(dtype)
    ones = torch.ones(logits.shape[0], dtype=dtype, device=logits.device)
    if kind == SINGLE_LABEL:
        return F.cross_entropy(logits, labels.reshape(-1), reduction="none"), ones
    if kind == REGRESSION:
        targets = labels.to(dtype).reshape(logits.shape[0], -1)  # (B, C)
        return (logits.reshape(logits.shape[0], -1) - targets).square().mean(dim=1), ones
    if kind == MULTI_LABEL:
        losses = F.binary_cross_entropy_with_logits(logits, labels.to(dtype), reduction="none")
        return losses.mean(dim=1), ones
    raise ValueError(f"no per-example loss for head kind {kind!r}")


def check_against_batch_loss(
    losses: torch.Tensor, weights: torch.Tensor, batch_loss: torch.Tensor | None
) -> None:
    """Raise unless ``sum(weights * losses) / sum(weights)`` equals the model's batch loss.

    Relative tolerance 1e-3 (both come from the same logits, so only summation order differs).

    Raises:
        RuntimeError: if the model returned no loss or a different value.
    """
    if batch_loss is None:
        raise RuntimeError("the model returned no loss for a batch with labels")
    total = float(weights.sum())
    if total == 0:
        return
    ours = float((weights * losses.detach()).sum()) / total
    theirs = float(batch_loss)
    if not math.isclose(ours, theirs, rel_tol=1e-3, abs_tol=1e-6):
        raise RuntimeError(
            f"the per-example losses recombine to {ours:.6g} but model(**batch).loss is "
            f"{theirs:.6g}: this model's loss is not the standard one for its head; the "
            "batched per-example path cannot be used"
        )


def sample_labels(
    kind: str, logits: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution (the Monte Carlo Fisher).

    Causal LM: at every position whose shifted label is not -100, draw
    ``y ~ softmax(logits_t)`` (row-major order over those positions, one
    ``torch.multinomial`` call on float32 probabilities, float64 for float64 logits); return a
    ``(B, T)`` label tensor in the unshifted convention,
    -100 elsewhere. Single-label classification: ``y_n ~ softmax(logits_n)``, shape ``(B,)``.

    Raises:
        ValueError: for any other head kind, or a causal LM without ``labels``.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        if kind == CAUSAL_LM:
            if labels is None:
                raise ValueError("sampled Fisher on a causal LM needs labels to mark positions")
            shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
            positions = shifted != IGNORE_INDEX
            probabilities = torch.softmax(logits[positions].to(dtype), dim=-1)  # (P, V)
            sampled = torch.full_like(shifted, IGNORE_INDEX)
            if probabilities.shape[0] > 0:
                draws = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
                sampled[positions] = draws
            return F.pad(sampled, (1, 0), value=IGNORE_INDEX)[:, :-1]  # undo the shift
        if kind == SINGLE_LABEL:
            probabilities = torch.softmax(logits.to(dtype), dim=-1)  # (B, C)
            return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
    raise ValueError(
        f"estimator='sampled' supports causal LMs and single-label classifiers, not {kind!r}"
    )
