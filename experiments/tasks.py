"""Tasks of the quality runner: data, split, training examples and the held-out metric.

A task entry of a config: ``{"name": ..., "heldout": 300, "train_examples": null, ...}``.

- ``"rotten_tomatoes"``: generative sentiment as the CLI does it (``stiefel_peft.cli``):
  prompt ``"Review: ...\\nSentiment (positive or negative):"``, loss on the label token,
  metric = accuracy of the higher label-word logit on the held-out split.
- ``"reasoning_gym:<name>"``: ``reasoning_gym.create_dataset(name, size, seed, **dataset_options)``;
  prompt ``"Question: ...\\nAnswer:"``, completion ``" <answer><eos>"``; metric = exact match of
  the greedy answer (first line, stripped): ``ds.score_answer(answer, entry) == 1``. The mean
  ``score_answer`` (partial credit) is recorded too. Needs ``pip install reasoning-gym==0.1.25``.
- ``"synthetic_sentiment"`` / ``"synthetic_first_word"``: tiny generated tasks for the smoke
  test (classification and exact-match generation) over the tiny model's vocabulary.

The held-out split is fixed by ``split_seed`` (the same for every seed and method), so "before"
is one number per (model, task).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from stiefel_peft.cli.assets import load_rotten_tomatoes
from stiefel_peft.cli.encoding import (
    SENTIMENT_LABEL_NAMES,
    SENTIMENT_TEMPLATE,
    ExampleCollator,
    label_words_for,
    split_examples,
)
from stiefel_peft.cli.scoring import classification_accuracy

__all__ = ["REASONING_GYM_REQUIREMENT", "Task", "evaluate", "load_task"]

REASONING_GYM_REQUIREMENT = "reasoning-gym==0.1.25"
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
POSITIVE = ("good", "great", "fun")
NEGATIVE = ("bad", "dull", "awful")
FILLER = ("the", "a", "movie", "plot", "actor", "film")
ANIMALS = ("cat", "dog", "red", "blue", "movie", "plot")


@dataclass
class Task:
    """Examples split for training and held-out scoring, and how to score them.

    ``kind`` is ``"classification"`` (examples ``{"text", "label"}``, metric accuracy) or
    ``"generation"`` (examples ``{"prompt", "completion", "entry"}``, metric exact match).
    """

    name: str
    kind: str
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    label_words: tuple[str, ...] | None = None
    template: str = SENTIMENT_TEMPLATE
    max_length: int = 128
    max_new_tokens: int = 16
    scorer: Any = None  # a reasoning_gym dataset (score_answer) or None for string equality
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "exact_match"

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> ExampleCollator:
        return ExampleCollator(tokenizer, self.label_words, self.template, self.max_length)


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise RuntimeError(
            "reasoning_gym tasks need the package reasoning-gym (not part of the install path); "
            f"install it with: pip install {REASONING_GYM_REQUIREMENT}"
        ) from None
    return reasoning_gym


def _synthetic_sentiment(count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        label = rng.randrange(2)
        majority, minority = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
        words = [rng.choice(majority) for _ in range(2)] + [rng.choice(minority)]
        words += [rng.choice(FILLER) for _ in range(rng.randrange(1, 4))]
        rng.shuffle(words)
        examples.append({"text": " ".join(words), "label": label})
    return examples


def _generation_examples(items: list[dict[str, Any]], eos: str) -> list[dict[str, Any]]:
    return [
        {
            "prompt": QUESTION_TEMPLATE.format(question=item["question"]),
            "completion": f" {item['answer']}{eos}",
            "entry": item,
        }
        for item in items
    ]


def load_task(
    entry: dict[str, Any], tokenizer: PreTrainedTokenizerBase, split_seed: int, max_length: int
) -> Task:
    """Build a :class:`Task` from a config entry (see the module docstring).

    Raises:
        ValueError: an unknown task name or a held-out size that leaves no training data.
        RuntimeError: reasoning_gym is needed and missing (the message names the install).
    """
    name = entry["name"]
    heldout = int(entry.get("heldout", 300))
    train_examples = entry.get("train_examples")
    eos = tokenizer.eos_token or ""
    if name in ("rotten_tomatoes", "synthetic_sentiment"):
        examples = (
            load_rotten_tomatoes()
            if name == "rotten_tomatoes"
            else _synthetic_sentiment(int(entry.get("size", 256)), split_seed)
        )
        train, held = split_examples(examples, heldout=heldout, seed=split_seed)
        task = Task(
            name,
            "classification",
            train,
            held,
            label_words_for(SENTIMENT_LABEL_NAMES),
            SENTIMENT_TEMPLATE,
            max_length,
        )
    elif name == "synthetic_first_word":
        rng = random.Random(split_seed)
        items = []
        for _ in range(int(entry.get("size", 256))):
            words = [rng.choice(ANIMALS) for _ in range(3)]
            items.append(
                {"question": "first word of " + " ".join(words) + " ?", "answer": words[0]}
            )
        train, held = split_examples(_generation_examples(items, eos), heldout, split_seed)
        task = Task(
            name,
            "generation",
            train,
            held,
            None,
            QUESTION_TEMPLATE,
            max_length,
            int(entry.get("max_new_tokens", 4)),
        )
    elif name.startswith("reasoning_gym:"):
        reasoning_gym = _import_reasoning_gym()
        dataset_name = name.split(":", 1)[1]
        options = dict(entry.get("dataset_options", {}))
        size = int(entry.get("size", 2000))
        # The generator's own seed fixes the items; the split seed fixes which are held out.
        dataset = reasoning_gym.create_dataset(dataset_name, size=size, seed=split_seed, **options)
        items = [dict(item) for item in dataset]
        train, held = split_examples(_generation_examples(items, eos), heldout, split_seed)
        task = Task(
            name,
            "generation",
            train,
            held,
            None,
            QUESTION_TEMPLATE,
            max_length,
            int(entry.get("max_new_tokens", 16)),
            scorer=dataset,
            info={"dataset_options": options, "size": size},
        )
    else:
        raise ValueError(
            f"unknown task {name!r}; use 'rotten_tomatoes', 'reasoning_gym:<name>', "
            "'synthetic_sentiment' or 'synthetic_first_word'"
        )
    if train_examples is not None:
        task.train = task.train[: int(train_examples)]
    return task


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


def evaluate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task
) -> dict[str, float]:
    """The held-out metric (``task.metric``) and, for generation, the mean partial score."""
    if task.kind == "classification":
        value = classification_accuracy(
            model,
            tokenizer,
            task.heldout,
            task.label_words,
            batch_size=32,
            template=task.template,
            max_length=task.max_length,
        )
        return {"accuracy": value}
    answers = generate_answers(
        model, tokenizer, [e["prompt"] for e in task.heldout], task.max_new_tokens
    )
    scores = [
        _score(task, answer, example) for answer, example in zip(answers, task.heldout, strict=True)
    ]
    return {
        "exact_match": sum(s == 1.0 for s in scores) / len(scores),
        "mean_score": sum(scores) / len(scores),
    }
