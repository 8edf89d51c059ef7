"""Scoring a model on a task's split: accuracy of a classification task (label-word logits for a
causal LM, argmax of a classifier head for a sequence classifier), exact match of generated
answers, or perplexity of a language-modelling task."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from experiments.classifier import SEQUENCE_CLASSIFICATION, classifier_accuracy
from experiments.tasks import Task
from stiefel_peft.cli.loss import supervised_loss
from stiefel_peft.cli.scoring import classification_accuracy

__all__ = ["evaluate", "generate_answers", "perplexity"]


def _score(task: Task, answer: str, example: dict[str, Any]) -> float:
    if task.scorer is not None:
        return float(task.scorer.score_answer(answer=answer, entry=example["entry"]))
    return float(answer == str(example["entry"]["answer"]))


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers: left-padded batches, decoded without special tokens, first line, stripped."""
    device = next(model.parameters()).device
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [
                tokenizer.encode(p, add_special_tokens=True)
                for p in prompts[start : start + batch_size]
            ]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, ids in enumerate(encoded):  # left padding: every prompt ends at column -1
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # (B, width + new)
            for row in output[:, width:]:
                text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
                answers.append(text.strip().split("\n")[0].strip())
    finally:
        model.train(was_training)
    return answers


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: list[dict[str, Any]],
    batch_size: int = 16,
) -> dict[str, float]:
    """``exp(sum NLL / tokens)`` over every predicted token of ``examples``, and the mean NLL."""
    collate = task.collator(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            batch = {key: value.to(device) for key, value in batch.items()}
            total += float(supervised_loss(model, batch, reduction="sum"))
            tokens += int((batch["labels"][:, 1:] != -100).sum())
    finally:
        model.train(was_training)
    return {"perplexity": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens}


def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, split: str = "test"
) -> dict[str, float]:
    """The metric (``task.metric``) on ``split`` (``"test"`` or ``"validation"``) and, for
    generation, the mean partial score."""
    examples = task.split(split)
    if task.kind == "language_modeling":
        return perplexity(model, tokenizer, task, examples)
    if task.kind == SEQUENCE_CLASSIFICATION:
        return {"accuracy": classifier_accuracy(model, tokenizer, examples, task.max_length)}
    if task.kind == "classification":
        value = classification_accuracy(
            model,
            tokenizer,
            examples,
            task.label_words,
            batch_size=32,
            template=task.template,
            max_length=task.max_length,
        )
        return {"accuracy": value}
    answers = generate_answers(
        model, tokenizer, [e["prompt"] for e in examples], task.max_new_tokens
    )
    scores = [
        _score(task, answer, example) for answer, example in zip(answers, examples, strict=True)
    ]
    return {
        "exact_match": sum(s == 1.0 for s in scores) / len(scores),
        "mean_score": sum(scores) / len(scores),
    }
