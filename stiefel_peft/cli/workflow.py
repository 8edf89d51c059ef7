"""The steps shared by the commands: the run's data, device, evaluation, plot, JSON."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from stiefel_peft.cli.assets import MissingAssetError, load_builtin_dataset
from stiefel_peft.cli.encoding import ExampleCollator, label_words_for, split_examples
from stiefel_peft.cli.files import (
    classification_examples,
    prompt_completion_examples,
    read_records,
)
from stiefel_peft.cli.options import UsageError
from stiefel_peft.cli.scoring import classification_accuracy
from stiefel_peft.cli.settings import DEFAULT_LABEL_NAMES, DataSettings
from stiefel_peft.cli.sources import data_kind, read_dataset_rows


class SplitData:
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


def _examples(
    records: list[dict[str, Any]], source: str, settings: DataSettings, names: Any
) -> tuple[list[dict[str, Any]], tuple[str, ...] | None]:
    if settings.prompt_column is not None:
        pairs = prompt_completion_examples(
            records, source, settings.prompt_column, settings.completion_column
        )
        return list(pairs), None
    return classification_examples(
        records, source, settings.text_column, settings.label_column, names
    )


def load_split_data(settings: DataSettings) -> SplitData:
    """Load and split the data; every problem becomes a :class:`UsageError` (cheap, no model).

    Without ``settings.eval_split`` the held-out examples are ``settings.heldout`` examples
    split off the training rows (a seeded shuffle); with it, they are ``settings.heldout``
    examples of that split (seeded sample; all of them when it is smaller) and every training
    row trains.
    """
    names: Any = (
        tuple(n.strip() for n in settings.label_names.split(",")) if settings.label_names else None
    )
    evaluation: list[dict[str, Any]] | None = None
    try:
        kind = data_kind(settings.data)
        if kind in ("builtin", "file") and (settings.split or settings.eval_split):
            flag = "--split" if settings.split else "--eval-split"
            raise ValueError(
                f"{flag} applies to data with named splits (a folder saved with datasets, or a "
                f"hub dataset); {settings.data!r} holds one split"
            )
        if kind == "builtin":
            records: list[dict[str, Any]] = list(load_builtin_dataset(settings.data))
            if settings.prompt_column is None:
                names = names or tuple(DEFAULT_LABEL_NAMES.split(","))
        elif kind == "file":
            records = read_records(settings.data)
        else:
            rows = read_dataset_rows(
                settings.data, kind, settings.split, settings.eval_split, settings.label_column
            )
            records, evaluation = rows.train, rows.evaluation
            names = names or rows.label_names
        examples, names = _examples(records, settings.data, settings, names)
        if evaluation is not None:
            where = f"{settings.data} split {settings.eval_split!r}"
            evaluation, _ = _examples(evaluation, where, settings, names)
        if names is not None:
            label_words_for(names)  # validates the names
    except (ValueError, KeyError, MissingAssetError, FileNotFoundError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    if evaluation is not None:
        order = list(range(len(evaluation)))
        random.Random(settings.seed).shuffle(order)
        train, heldout = examples, [evaluation[i] for i in order[: settings.heldout]]
    else:
        if settings.heldout >= len(examples):
            raise UsageError(
                f"--heldout {settings.heldout} leaves no training example out of {len(examples)}"
            )
        train, heldout = split_examples(examples, heldout=settings.heldout, seed=settings.seed)
    limit = getattr(settings, "train_examples", None)  # finetune only
    if limit:
        train = train[:limit]
    return SplitData(train, heldout, names)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def collator(tokenizer: Any, data: SplitData, settings: DataSettings) -> ExampleCollator:
    return ExampleCollator(tokenizer, data.label_words, settings.template, settings.max_length)


@torch.no_grad()
def completion_accuracy(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    collate: ExampleCollator,
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
    data: SplitData,
    collate: ExampleCollator,
    settings: DataSettings,
    device: torch.device,
) -> float | None:
    if not data.heldout:
        return None
    progress = not settings.quiet
    if data.kind == "classification":
        return classification_accuracy(
            model,
            tokenizer,
            data.heldout,
            data.label_words,
            batch_size=32,
            progress=progress,
            template=settings.template,
            max_length=settings.max_length,
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
