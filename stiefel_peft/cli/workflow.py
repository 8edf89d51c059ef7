"""The steps shared by the commands: data, device, batches, evaluation, plot, JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from stiefel_peft.cli.arguments import DEFAULT_LABEL_NAMES, UsageError
from stiefel_peft.cli.assets import BUILTIN_DATASETS, MissingAssetError, load_builtin_dataset
from stiefel_peft.cli.files import load_classification_file, load_prompt_completion_file
from stiefel_peft.cli.scoring import classification_accuracy
from stiefel_peft.cli.tasks import TaskCollator, label_words_for, split_examples


class TaskData:
    """Examples split for a run: either classification (``label_words``) or completions."""

    def __init__(
        self,
        train: list[dict[str, Any]],
        heldout: list[dict[str, Any]],
        label_names: tuple[str, ...] | None,
    ) -> None:
        self.train = train
        self.heldout = heldout
        self.label_names = label_names
        self.label_words = label_words_for(label_names) if label_names is not None else None

    @property
    def kind(self) -> str:
        return "classification" if self.label_names is not None else "prompt_completion"


def load_task_data(arguments: argparse.Namespace) -> TaskData:
    """Load and split the data; every problem becomes a :class:`UsageError` (cheap, no model)."""
    names = (
        tuple(n.strip() for n in arguments.label_names.split(","))
        if arguments.label_names
        else None
    )
    try:
        if arguments.data in BUILTIN_DATASETS:
            examples: list[dict[str, Any]] = list(load_builtin_dataset(arguments.data))
            names = names or tuple(DEFAULT_LABEL_NAMES.split(","))
        elif arguments.prompt_column is not None:
            examples = list(
                load_prompt_completion_file(
                    arguments.data, arguments.prompt_column, arguments.completion_column
                )
            )
            names = None
        else:
            examples, names = load_classification_file(
                arguments.data, arguments.text_column, arguments.label_column, names
            )
        if names is not None:
            label_words_for(names)  # validates the names
    except (ValueError, KeyError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    except (MissingAssetError, FileNotFoundError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    if arguments.heldout >= len(examples):
        raise UsageError(
            f"--heldout {arguments.heldout} leaves no training example out of {len(examples)}"
        )
    train, heldout = split_examples(examples, heldout=arguments.heldout, seed=arguments.seed)
    if getattr(arguments, "train_examples", None):
        train = train[: arguments.train_examples]
    return TaskData(train, heldout, names)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def collator(tokenizer: Any, data: TaskData, arguments: argparse.Namespace) -> TaskCollator:
    return TaskCollator(tokenizer, data.label_words, arguments.template, arguments.max_length)


def _length(example: dict[str, Any]) -> int:
    return (
        len(str(example.get("text", "")))
        + len(str(example.get("prompt", "")))
        + len(str(example.get("completion", "")))
    )


def length_grouped_order(
    examples: Sequence[dict[str, Any]], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """Batches of indices for one epoch: a seeded shuffle, then within windows of 8 batches the
    examples are sorted by length (less padding: reviews are 36 tokens on average but a random
    batch pads to ~60), and the batches are shuffled again so lengths do not trend over time."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    window = 8 * batch_size
    groups: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: _length(examples[i]))
        groups.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    permutation = torch.randperm(len(groups), generator=generator).tolist()
    return [groups[i] for i in permutation]


def batches(
    examples: Sequence[dict[str, Any]],
    collate: TaskCollator,
    batch_size: int,
    device: torch.device,
    seed: int,
    shuffle: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless HF batches on ``device``: in order, or shuffled and length-grouped (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        if shuffle:
            groups = length_grouped_order(examples, batch_size, generator)
        else:
            groups = [
                list(range(i, min(i + batch_size, len(examples))))
                for i in range(0, len(examples), batch_size)
            ]
        for indices in groups:
            batch = collate([examples[i] for i in indices])
            yield {key: value.to(device) for key, value in batch.items()}


def calibration_batches(
    data: TaskData,
    collate: TaskCollator,
    arguments: argparse.Namespace,
    device: torch.device,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    examples = data.train[: arguments.calibration_examples]
    stream = batches(examples, collate, batch_size, device, arguments.seed, shuffle=False)
    return [next(stream) for _ in range(math.ceil(len(examples) / batch_size))]


@torch.no_grad()
def completion_accuracy(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    collate: TaskCollator,
    device: torch.device,
    progress: bool,
) -> float:
    """Fraction of examples whose every completion token is the model's greedy (argmax) choice
    under teacher forcing."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in tqdm(
            range(0, len(examples), 32), disable=not progress, desc="evaluating", unit="batch"
        ):
            batch = collate(examples[start : start + 32])
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            predicted = logits[:, :-1].argmax(-1)  # position t predicts token t + 1
            targets = batch["labels"][:, 1:]
            supervised = targets != -100
            correct += int(((predicted == targets) | ~supervised).all(dim=1).sum())
    finally:
        model.train(was_training)
    return correct / len(examples)


def accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    data: TaskData,
    collate: TaskCollator,
    arguments: argparse.Namespace,
    device: torch.device,
) -> float | None:
    if not data.heldout:
        return None
    progress = not arguments.quiet
    if data.kind == "classification":
        return classification_accuracy(
            model,
            tokenizer,
            data.heldout,
            data.label_words,
            batch_size=32,
            progress=progress,
            template=arguments.template,
            max_length=arguments.max_length,
        )
    return completion_accuracy(model, data.heldout, collate, device, progress)


def plot_block_scores(
    scores: dict[int, float], selected: Sequence[int], path: Path, title: str
) -> Path | None:
    """A bar chart of the per-block scores with the selected blocks highlighted.

    Without matplotlib (an optional dependency) the plot is skipped with a one-line warning on
    stderr and None is returned; everything else of the run is written as usual.
    """
    try:
        import matplotlib
    except ImportError:
        print(
            f"warning: matplotlib is not installed, so {path.name} was not written "
            "(pip install matplotlib, or pass --no-plot)",
            file=sys.stderr,
        )
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    indices = sorted(scores)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.28 * len(indices) + 2), 3.6))
    colours = ["#d1495b" if i in selected else "#9aa5b1" for i in indices]
    axes.bar(indices, [scores[i] for i in indices], color=colours)
    axes.set_xlabel("block")
    axes.set_ylabel("Fisher score")
    axes.set_title(title)
    axes.set_xticks(indices)
    axes.tick_params(axis="x", labelsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#d1495b", "#9aa5b1")]
    axes.legend(handles, ["selected", "not selected"], loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
