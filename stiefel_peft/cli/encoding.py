"""Encoding examples for causal LMs: generative classification and prompt/completion pairs.

A classification example ``{"text": str, "label": int}`` becomes the prompt
``template.format(text=text)`` followed by the answer ``label_words[label]`` (for the built-in
sentiment task ``"Review: ...\\nSentiment (positive or negative):"`` then ``" negative"`` or
``" positive"``, each one SmolLM2 token). Training puts the loss on the answer tokens only; scoring
(:mod:`stiefel_peft.cli.scoring`) compares the model's preferences for the label words after
the prompt.

Prompt and answer are tokenized separately and concatenated, in training and in scoring alike,
so both see the same token boundary. Batches are right padded.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from stiefel_peft.cli.loss import IGNORE_INDEX

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "IGNORE_INDEX",
    "SENTIMENT_LABEL_NAMES",
    "SENTIMENT_TEMPLATE",
    "Encoded",
    "ExampleCollator",
    "collate",
    "encode_classification",
    "encode_prompt_completion",
    "label_words_for",
    "split_examples",
    "to_prompt_completion",
]

SENTIMENT_TEMPLATE = "Review: {text}\nSentiment (positive or negative):"
SENTIMENT_LABEL_NAMES: tuple[str, ...] = ("negative", "positive")  # index = label
# Rotten Tomatoes snippets are at most ~70 SmolLM2 tokens with the template; 128 never truncates.
DEFAULT_MAX_LENGTH = 128


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``prompt_ids`` then ``answer_ids`` (the supervised tokens)."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def label_words_for(label_names: Sequence[str]) -> tuple[str, ...]:
    """The answers for ``label_names``: each name with a leading space (``" positive"``).

    Raises:
        ValueError: fewer than two names, an empty name, or repeated names.
    """
    names = tuple(label_names)
    if len(names) < 2 or len(set(names)) != len(names) or not all(n.strip() for n in names):
        raise ValueError(f"label_names must be >= 2 distinct non-empty names, got {names!r}")
    return tuple(" " + name.strip() for name in names)


def _check_template(template: str) -> None:
    if "{text}" not in template:
        raise ValueError(f"template must contain the field '{{text}}', got {template!r}")


def _encode_prompt(
    tokenizer: PreTrainedTokenizerBase, template: str, text: str, budget: int
) -> list[int]:
    """Prompt ids of at most ``budget`` tokens, cutting the end of ``text`` (never the template).

    Raises:
        ValueError: the template alone is longer than ``budget``.
    """
    ids = tokenizer.encode(template.format(text=text), add_special_tokens=True)
    if len(ids) <= budget:
        return ids
    text_ids = tokenizer.encode(text, add_special_tokens=False)
    keep = len(text_ids) - (len(ids) - budget)
    while keep > 0:
        # Re-tokenizing the shortened text can merge differently at the cut, so check again.
        ids = tokenizer.encode(
            template.format(text=tokenizer.decode(text_ids[:keep])), add_special_tokens=True
        )
        if len(ids) <= budget:
            return ids
        keep -= max(1, len(ids) - budget)
    ids = tokenizer.encode(template.format(text=""), add_special_tokens=True)
    if len(ids) > budget:
        raise ValueError(
            f"max_length leaves {budget} prompt tokens, fewer than the template's {len(ids)}; "
            "raise max_length or shorten the template"
        )
    return ids


def encode_classification(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    label: int | None,
    label_words: Sequence[str],
    template: str = SENTIMENT_TEMPLATE,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Encoded:
    """Tokenize ``template.format(text=text)`` + ``label_words[label]`` into <= max_length ids.

    The review text is truncated (from its end) so that the answer always fits; the prompt gets
    ``max_length`` minus the longest label word's tokens, so the prompt is the same whichever
    label follows. With ``label=None`` the answer is empty (for scoring).

    Raises:
        ValueError: ``label`` outside ``range(len(label_words))``, a template without
            ``{text}``, or a ``max_length`` too small for the template and answer.
    """
    _check_template(template)
    answers = [tokenizer.encode(word, add_special_tokens=False) for word in label_words]
    if label is not None and not 0 <= label < len(label_words):
        raise ValueError(f"label must be in 0..{len(label_words) - 1}, got {label}")
    answer_ids = answers[label] if label is not None else []
    longest = max(len(ids) for ids in answers)
    prompt_ids = _encode_prompt(tokenizer, template, text, max_length - longest)
    return Encoded(tuple(prompt_ids), tuple(answer_ids))


def encode_prompt_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    completion: str,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Encoded:
    """Tokenize a prompt/completion pair; a long prompt loses its start (the end stays).

    Raises:
        ValueError: the completion is empty or leaves no room for one prompt token.
    """
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    answer_ids = tokenizer.encode(completion, add_special_tokens=False)
    if not answer_ids:
        raise ValueError(f"completion tokenizes to no tokens: {completion!r}")
    budget = max_length - len(answer_ids)
    if budget < 1:
        raise ValueError(
            f"a completion of {len(answer_ids)} tokens does not fit max_length={max_length} "
            "with a prompt; raise max_length"
        )
    return Encoded(tuple(prompt_ids[-budget:]), tuple(answer_ids))


def collate(encoded: Sequence[Encoded], pad_token_id: int) -> dict[str, Tensor]:
    """Right-padded HF batch: ``input_ids``, ``attention_mask``, ``labels`` (all (B, L) int64).

    ``labels`` equals ``input_ids`` on the answer tokens and ``-100`` elsewhere (prompt and
    padding); the model shifts it, so the loss is on predicting the answer.

    Raises:
        ValueError: an empty batch, or ``pad_token_id`` is None.
    """
    if not encoded:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to eos)")
    width = max(len(item.prompt_ids) + len(item.answer_ids) for item in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(encoded):
        start, end = len(item.prompt_ids), len(item.prompt_ids) + len(item.answer_ids)
        input_ids[row, :end] = torch.tensor(item.prompt_ids + item.answer_ids, dtype=torch.long)
        attention_mask[row, :end] = 1
        labels[row, start:end] = input_ids[row, start:end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class ExampleCollator:
    """A DataLoader ``collate_fn`` for classification or prompt/completion examples.

    Each example is either ``{"text", "label"}`` (encoded with ``template`` and ``label_words``)
    or ``{"prompt", "completion"}``.

    Raises (on call):
        ValueError: an example with neither pair of keys, or classification without label_words.
    """

    tokenizer: PreTrainedTokenizerBase
    label_words: Sequence[str] | None = None
    template: str = SENTIMENT_TEMPLATE
    max_length: int = DEFAULT_MAX_LENGTH

    def encode(self, example: Mapping[str, Any]) -> Encoded:
        if "prompt" in example and "completion" in example:
            return encode_prompt_completion(
                self.tokenizer, example["prompt"], example["completion"], self.max_length
            )
        if "text" in example and "label" in example:
            if self.label_words is None:
                raise ValueError("classification examples need ExampleCollator(label_words=...)")
            return encode_classification(
                self.tokenizer,
                example["text"],
                int(example["label"]),
                self.label_words,
                self.template,
                self.max_length,
            )
        raise ValueError(
            "an example needs keys 'text' and 'label' or 'prompt' and 'completion', "
            f"got {sorted(example)}"
        )

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        return collate([self.encode(example) for example in examples], self.tokenizer.pad_token_id)


def to_prompt_completion(
    examples: Sequence[Mapping[str, Any]],
    label_words: Sequence[str],
    template: str = SENTIMENT_TEMPLATE,
) -> list[dict[str, str]]:
    """Classification examples as ``{"prompt": template(text), "completion": label word}``.

    Raises:
        ValueError: a template without ``{text}`` or a label outside the label words.
    """
    _check_template(template)
    pairs = []
    for example in examples:
        label = int(example["label"])
        if not 0 <= label < len(label_words):
            raise ValueError(f"label must be in 0..{len(label_words) - 1}, got {label}")
        pairs.append(
            {"prompt": template.format(text=example["text"]), "completion": label_words[label]}
        )
    return pairs


def split_examples(
    examples: Sequence[Any], heldout: int = 300, seed: int = 0
) -> tuple[list[Any], list[Any]]:
    """Deterministic (train, heldout) split: a seeded shuffle, then the first ``heldout`` out.

    Raises:
        ValueError: ``heldout`` is negative or leaves no training example.
    """
    if not 0 <= heldout < len(examples):
        raise ValueError(
            f"heldout must be in 0..{len(examples) - 1} for {len(examples)} examples, got {heldout}"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[heldout:]], [examples[i] for i in order[:heldout]]
