"""Scoring generative classification: which label word a causal LM prefers after a prompt.

The prompts are encoded as in training (:mod:`stiefel_peft.cli.encoding`), so scoring sees the same
token boundary between prompt and answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stiefel_peft.cli.encoding import (
    DEFAULT_MAX_LENGTH,
    SENTIMENT_TEMPLATE,
    Encoded,
    collate,
    encode_classification,
)
from stiefel_peft.cli.loss import IGNORE_INDEX, accepts_logits_to_keep, supervised_logits

__all__ = ["classification_accuracy", "label_scores", "predict_labels"]


def _single_token_ids(
    tokenizer: PreTrainedTokenizerBase, label_words: Sequence[str]
) -> list[int] | None:
    """The label words' token ids if each is one token and they differ, else None."""
    ids = [tokenizer.encode(word, add_special_tokens=False) for word in label_words]
    if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids):
        return [i[0] for i in ids]
    return None


def _answer_log_probs(model: PreTrainedModel, batch: dict[str, Tensor]) -> Tensor:
    """Sum over answer tokens of log p(token | prefix), per row: (B,)."""
    logits, targets = supervised_logits(model, batch)  # (B, C, V), (B, C): answer columns only
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    supervised = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, C)
    return (picked * supervised).sum(dim=-1)


def label_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Mapping[str, Any]],
    label_words: Sequence[str],
    batch_size: int = 32,
    progress: bool = False,
    template: str = SENTIMENT_TEMPLATE,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Tensor:
    """How strongly the model prefers each label's answer after each prompt: (N, K) float32.

    When every label word is one distinct token the score is that token's next-token logit at
    the prompt's last real token (right padding): one forward pass per batch, the same argmax
    as the log-probability. Otherwise the score is the answer's summed log-probability, one
    pass per label:

    .. math:: s_k = \\sum_{t \\in \\text{answer}_k} \\log p(w_t \\mid w_{<t})

    Prompts are batched in order of length (less padding); rows come back in
    the order of ``examples``. Runs under ``torch.no_grad`` in eval mode and restores the mode.
    Examples need ``"text"``; ``"label"`` is ignored.

    Raises:
        ValueError: ``batch_size`` < 1 or fewer than two label words.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(label_words) < 2:
        raise ValueError(f"label_words needs >= 2 words, got {list(label_words)}")
    device = next(model.parameters()).device
    answers = [tokenizer.encode(word, add_special_tokens=False) for word in label_words]
    token_ids = _single_token_ids(tokenizer, label_words)
    keep_logits = accepts_logits_to_keep(model)
    # Scoring in order of prompt length keeps the padding (wasted compute) in each batch small.
    prompts = [
        encode_classification(tokenizer, e["text"], None, label_words, template, max_length)
        for e in examples
    ]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i].prompt_ids))
    scores = torch.empty(len(examples), len(label_words))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, disable=not progress, desc="scoring", unit="batch"):
                chunk = order[start : start + batch_size]
                if token_ids is not None:
                    batch = collate([prompts[i] for i in chunk], tokenizer.pad_token_id)
                    batch = {k: v.to(device) for k, v in batch.items()}
                    lengths = batch["attention_mask"].sum(dim=1)  # (B,)
                    width = batch["input_ids"].shape[1]
                    # Every row's last real token lies in the last (width - min length + 1)
                    # positions, so only those need the (large) vocabulary projection.
                    keep = width - int(lengths.min()) + 1
                    extra = {"logits_to_keep": keep} if keep_logits else {}
                    logits = model(
                        input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        **extra,
                    ).logits  # (B, keep or width, V)
                    last = lengths - 1 - (width - logits.shape[1])  # (B,) index into logits
                    rows = torch.arange(len(chunk), device=device)
                    chunk_scores = logits[rows, last][:, token_ids]  # (B, V) -> (B, K)
                else:
                    per_label = []
                    for label in range(len(label_words)):
                        encoded = [
                            Encoded(prompts[i].prompt_ids, tuple(answers[label])) for i in chunk
                        ]
                        batch = collate(encoded, tokenizer.pad_token_id)
                        batch = {k: v.to(device) for k, v in batch.items()}
                        per_label.append(_answer_log_probs(model, batch))
                    chunk_scores = torch.stack(per_label, dim=1)  # (B, K)
                scores[chunk] = chunk_scores.float().cpu()
    finally:
        model.train(was_training)
    return scores


def predict_labels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Mapping[str, Any]],
    label_words: Sequence[str],
    batch_size: int = 32,
    progress: bool = False,
    template: str = SENTIMENT_TEMPLATE,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> list[int]:
    """The label whose answer the model finds most likely after each prompt.

    .. math:: \\hat y = \\arg\\max_k s_k \\quad (s \\text{ from } label\\_scores)

    Raises:
        ValueError: as :func:`label_scores`.
    """
    scores = label_scores(
        model, tokenizer, examples, label_words, batch_size, progress, template, max_length
    )
    return scores.argmax(dim=1).tolist()


def classification_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Mapping[str, Any]],
    label_words: Sequence[str],
    batch_size: int = 32,
    progress: bool = False,
    template: str = SENTIMENT_TEMPLATE,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> float:
    """Fraction of ``examples`` whose ``"label"`` equals :func:`predict_labels`' choice.

    Raises:
        ValueError: no examples, or as :func:`predict_labels`.
    """
    if not examples:
        raise ValueError("classification_accuracy needs at least one example")
    predicted = predict_labels(
        model, tokenizer, examples, label_words, batch_size, progress, template, max_length
    )
    correct = sum(int(p == int(e["label"])) for p, e in zip(predicted, examples, strict=True))
    return correct / len(examples)
