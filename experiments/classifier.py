"""The sequence-classification path of the quality runner: an encoder with a classifier head
(``*ForSequenceClassification``, e.g. all-MiniLM-L6-v2 as a BERT) on a classification task.

- Inputs: the example's text alone (no prompt template), truncated to ``max_length`` tokens,
  right-padded; labels are class ids ``(B,)`` (Rotten Tomatoes: 0 = negative, 1 = positive).
- Metric: accuracy of the argmax of the classifier logits (a fraction, as the causal-LM
  classification task records it, so ``aggregate.py`` treats both alike).
- Training: the loss is the cross entropy of the classifier logits, as the model's own
  ``.loss``. The runner's training loop (:func:`stiefel_peft.cli.trainer.fit`) computes
  :func:`stiefel_peft.cli.loss.supervised_loss`, the causal-LM loss, for every batch: it needs
  ``labels`` shaped like ``input_ids`` and reads ``model(...).logits`` as ``(B, T, V)``. So fit
  trains the classifier through :class:`NextTokenView` and batches from
  :class:`NextTokenCollator`, under which that loss *is* the classifier's cross entropy.
- The Fisher scores (calibration batches) use the plain class-id batches of
  :class:`ClassifierCollator`: ``stiefel_peft.fisher`` scores sequence classifiers on their
  own loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from stiefel_peft.cli.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from experiments.tasks import Task

__all__ = [
    "HEAD_MODULES",
    "SEQUENCE_CLASSIFICATION",
    "ClassifierCollator",
    "NextTokenCollator",
    "NextTokenView",
    "classifier_accuracy",
    "head_modules",
    "is_sequence_classifier",
    "next_token_training",
    "task_for_model",
]

# the task kind (``Task.kind``) of a classification task scored by a classifier head
SEQUENCE_CLASSIFICATION = "sequence_classification"
# the names transformers gives a new classification head (BERT-likes; Llama-likes)
HEAD_MODULES = ("classifier", "score")


def is_sequence_classifier(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers sequence classifier (``*ForSequenceClassification``)."""
    return type(model).__name__.endswith("ForSequenceClassification")


def head_modules(model: nn.Module) -> tuple[str, ...]:
    """The names of the classifier head modules of a sequence classifier (trained in full beside
    the adapters: ``modules_to_save``); ``()`` for any other model."""
    if not is_sequence_classifier(model):
        return ()
    children = dict(model.named_children())
    return tuple(name for name in HEAD_MODULES if name in children)


def task_for_model(task: Task, model: nn.Module, model_name: str) -> Task:
    """The task as ``model`` trains and is scored on it: the one place where the runner tells a
    sequence classifier from a causal LM.

    A causal LM gets ``task`` unchanged. A sequence classifier gets a copy of kind
    :data:`SEQUENCE_CLASSIFICATION` (same examples, splits and metric name, ``"accuracy"``),
    whose collator, training inputs and evaluation are this module's.

    Raises:
        ValueError: a sequence classifier on a task that is not classification (generation,
            language modelling), or whose head has another number of classes than the task.
    """
    if not is_sequence_classifier(model):
        return task
    head = f"model {model_name!r} is a sequence classifier ({type(model).__name__})"
    if task.kind != "classification":
        raise ValueError(
            f"{head}: it cannot do task {task.name!r} ({task.kind.replace('_', ' ')}, scored by "
            f"{task.metric}); give it a classification task ('rotten_tomatoes' or "
            "'synthetic_sentiment') or use a causal-LM model for this task"
        )
    classes = len(task.label_words or ())
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", 0))
    if num_labels != classes:
        raise ValueError(
            f"{head} with {num_labels} labels, but task {task.name!r} has {classes} classes; "
            f'load it with num_labels={classes} (model entry "options": {{"num_labels": '
            f"{classes}}})"
        )
    return replace(task, kind=SEQUENCE_CLASSIFICATION)


@dataclass
class ClassifierCollator:
    """A ``collate_fn`` for ``{"text", "label"}`` examples of a sequence classifier.

    Returns ``input_ids`` and ``attention_mask`` ``(B, T)`` (the tokenizer's own special tokens,
    at most ``max_length`` tokens, right padding, ``T`` the longest row) and ``labels`` ``(B,)``
    (the class ids).

    Raises (on call):
        ValueError: no examples, or an example without ``"text"`` or ``"label"``.
    """

    tokenizer: PreTrainedTokenizerBase
    max_length: int = 128

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("ClassifierCollator needs at least one example")
        missing = [sorted(e) for e in examples if "text" not in e or "label" not in e]
        if missing:
            raise ValueError(
                f"sequence-classification examples need 'text' and 'label'; got keys {missing[0]}"
            )
        encoded = self.tokenizer(
            [str(e["text"]) for e in examples],
            truncation=True,
            max_length=self.max_length,
            padding=True,
            padding_side="right",
            return_tensors="pt",
        )
        return {
            "input_ids": encoded["input_ids"],  # (B, T)
            "attention_mask": encoded["attention_mask"],  # (B, T)
            "labels": torch.tensor([int(e["label"]) for e in examples], dtype=torch.long),  # (B,)
        }


@torch.no_grad()
def classifier_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, Any]],
    max_length: int = 128,
    batch_size: int = 32,
) -> float:
    """Fraction of ``examples`` whose ``"label"`` is the argmax of the classifier logits.

    Args:
        model: a sequence classifier (or a peft model around one) returning ``.logits``
            ``(B, K)``.
        examples: ``{"text", "label"}`` dicts.

    Raises:
        ValueError: no examples.
    """
    if not examples:
        raise ValueError("classifier_accuracy needs at least one example")
    collate = ClassifierCollator(tokenizer, max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits  # (B, K)
            correct += int((logits.argmax(dim=-1).cpu() == batch["labels"]).sum())
    finally:
        model.train(was_training)
    return correct / len(examples)


class NextTokenView(nn.Module):
    """A sequence classifier seen as a causal LM by :func:`stiefel_peft.cli.trainer.fit`.

    fit's loss reads ``logits[:, t]`` against ``labels[:, t + 1]`` wherever the labels are not
    -100. The view returns the classifier's logits ``(B, K)`` at every position, ``(B, T, K)``
    (an expand: no copy), and :class:`NextTokenCollator` puts each row's class at column 1 and
    -100 elsewhere, so the loss is the mean cross entropy of the classifier logits over the
    batch, the model's own ``.loss``:

    .. math:: L = \\frac{1}{B} \\sum_b -\\log \\operatorname{softmax}(z_b)_{y_b}

    Training mode, parameters and devices are those of the wrapped model.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> SequenceClassifierOutput:
        logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits
        width = input_ids.shape[1]
        return SequenceClassifierOutput(logits=logits[:, None, :].expand(-1, width, -1))


@dataclass
class NextTokenCollator:
    """Class-id batches (``labels`` ``(B,)``) as :class:`NextTokenView` trains on them:
    ``labels`` ``(B, T)``, -100 except the class at column 1 (a one-column batch gets a padding
    column, which the attention mask hides). With ``micro_batch_tokens`` fit cuts the columns
    beyond a group's longest row, so every row needs two real tokens, as a BERT tokenizer's
    ``[CLS] ... [SEP]`` always has.

    Raises (on call):
        ValueError: a batch whose labels are not one class id per row.
    """

    collate: Callable[[Sequence[dict[str, Any]]], dict[str, Tensor]]
    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        batch = dict(self.collate(examples))
        input_ids, labels = batch["input_ids"], batch["labels"]  # (B, T), (B,)
        if labels.shape != input_ids.shape[:1]:
            raise ValueError(
                f"NextTokenCollator needs one class id per row, got labels {tuple(labels.shape)} "
                f"for input_ids {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] < 2:  # the class sits at column 1
            batch["input_ids"] = nn.functional.pad(input_ids, (0, 1), value=self.pad_token_id)
            batch["attention_mask"] = nn.functional.pad(batch["attention_mask"], (0, 1), value=0)
        token_labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)  # (B, T)
        token_labels[:, 1] = labels
        batch["labels"] = token_labels
        return batch


def next_token_training(
    model: PreTrainedModel, collate: ClassifierCollator
) -> tuple[NextTokenView, NextTokenCollator]:
    """The model and collator that fit trains for a sequence classifier (see the module)."""
    pad = collate.tokenizer.pad_token_id
    return NextTokenView(model), NextTokenCollator(collate, 0 if pad is None else int(pad))
