"""The command line: options into typed settings.

Every option's default is the settings' own (:mod:`stiefel_peft.cli.settings`, which reads the
library's); :func:`parse` returns the command and its settings. ``--config run_config.json``
(and ``--resume``, which reads the checkpoint's) replays a run's settings; options given on the
command line override them. The checks that need more than argparse are in
:mod:`stiefel_peft.cli.checks`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from stiefel_peft import __version__
from stiefel_peft.cli import merge_command, retractions_command
from stiefel_peft.cli.assets import BUILTIN_DATASETS, BUILTIN_MODELS, QUANTIZATIONS
from stiefel_peft.cli.options import (
    OneLineParser,
    UsageError,
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
)
from stiefel_peft.cli.settings import (
    DEFAULT_LABEL_NAMES,
    DataSettings,
    FinetuneSettings,
    FisherSettings,
)
from stiefel_peft.fisher import ESTIMATORS
from stiefel_peft.fora import DEFAULT_RELATIVE_LR, INITIALISATIONS, SELECTIONS
from stiefel_peft.geometry import RETRACTIONS

SETTINGS = {"finetune": FinetuneSettings, "fisher": FisherSettings}


def _add_model_and_data(parser: argparse.ArgumentParser, defaults: DataSettings) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument(
        "--model",
        default=defaults.model,
        help=f"a built-in model ({', '.join(sorted(BUILTIN_MODELS))}), a local Hugging Face "
        "folder of a causal LM, or a hub id org/name (default: %(default)s)",
    )
    group.add_argument(
        "--data",
        default=defaults.data,
        help=f"a built-in data set ({', '.join(sorted(BUILTIN_DATASETS))}), a .csv/.jsonl/.json "
        "file, a folder saved with datasets' save_to_disk, or a hub dataset name; with text and "
        "label columns, or prompt and completion columns (default: %(default)s)",
    )
    group.add_argument(
        "--split",
        default=defaults.split,
        help="the training split of data with named splits (default: train)",
    )
    group.add_argument(
        "--eval-split",
        default=defaults.eval_split,
        help="a split to take the held-out examples from (default: hold out training rows)",
    )
    group.add_argument(
        "--text-column",
        default=defaults.text_column,
        help="text column of a file (default: %(default)s)",
    )
    group.add_argument(
        "--label-column",
        default=defaults.label_column,
        help="label column of a file (default: %(default)s)",
    )
    group.add_argument(
        "--label-names",
        default=None,
        help="comma-separated label names, in label-index order; the model answers with these "
        f"words (default: {DEFAULT_LABEL_NAMES} for the built-in data, else the sorted distinct "
        "labels of the file)",
    )
    group.add_argument(
        "--prompt-column",
        default=None,
        help="use prompt/completion pairs: the prompt column (with --completion-column)",
    )
    group.add_argument(
        "--completion-column",
        default=defaults.completion_column,
        help="completion column (default: %(default)s)",
    )
    group.add_argument(
        "--template",
        default=defaults.template,
        help="prompt template for text/label data; {text} is replaced (default: %(default)r)",
    )
    group.add_argument(
        "--max-length",
        type=positive_int,
        default=defaults.max_length,
        help="tokens per example, the review text is truncated (default: %(default)s)",
    )
    group.add_argument(
        "--heldout",
        type=non_negative_int,
        default=defaults.heldout,
        help="held-out examples for the accuracy before and after (default: %(default)s)",
    )
    group.add_argument(
        "--calibration-examples",
        type=positive_int,
        default=defaults.calibration_examples,
        help="training examples scored by the Fisher pass (default: %(default)s)",
    )
    group.add_argument(
        "--estimator",
        choices=list(ESTIMATORS),
        default=defaults.estimator,
        help="Fisher estimator (default: %(default)s)",
    )
    group.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default=defaults.quantize,
        help="load the base model in 4-bit (nf4: QFoRA, needs bitsandbytes)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the split, the initialisation and the data order (default: %(default)s)",
    )
    group.add_argument(
        "--device",
        default=defaults.device,
        help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)",
    )
    group.add_argument(
        "--output", default=None, help="output directory (default: runs/<command>-<date>-<time>)"
    )
    group.add_argument(
        "--no-plot", action="store_true", help="do not write the PNG plot of the block scores"
    )
    group.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The ``stiefel-peft`` parser; every default comes from the command's settings class."""
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = OneLineParser(
        prog="stiefel-peft",
        description="FoRA: Fisher-selected blocks + LoRA with an orthonormal factor.",
    )
    parser.add_argument("--version", action="version", version=f"stiefel-peft {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    finetune = commands.add_parser(
        "finetune",
        help="fine-tune a model with FoRA (default: SmolLM2-135M on Rotten Tomatoes)",
        description="Score the blocks, adapt the top ones with FoRA, train, evaluate, save a plain "
        "peft LoRA adapter with fora_report.json, a plot of the block scores and the run config.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tuned = FinetuneSettings()
    _add_model_and_data(finetune, tuned)
    fora = finetune.add_argument_group("FoRA and training")
    fora.add_argument(
        "--budget",
        type=fraction,
        default=tuned.budget,
        help="fraction of blocks adapted, in (0, 1]",
    )
    fora.add_argument("--rank", type=positive_int, default=tuned.rank, help="LoRA rank r")
    fora.add_argument(
        "--alpha", type=positive_float, default=tuned.alpha, help="LoRA alpha (scaling alpha / r)"
    )
    fora.add_argument("--dropout", type=float, default=tuned.dropout, help="LoRA dropout")
    fora.add_argument(
        "--retraction",
        choices=sorted(RETRACTIONS),
        default=tuned.retraction,
        help="retraction of the Stiefel step",
    )
    fora.add_argument(
        "--stiefel-factor",
        choices=("B", "A"),
        default=tuned.stiefel_factor,
        help="the factor kept orthonormal: B (lora_B, columns) or A (lora_A, rows)",
    )
    fora.add_argument(
        "--init",
        choices=sorted(INITIALISATIONS),
        default=tuned.init,
        help="initialisation of the factors: orthonormal (random frame), gradient (from the "
        "calibration gradient) or peft (its own, not orthonormal)",
    )
    fora.add_argument(
        "--selection",
        choices=sorted(SELECTIONS),
        default=tuned.selection,
        help="how the Fisher scores choose the adapted layers at the same parameter budget: "
        "top_blocks (the paper), top_modules (layer by layer) or fisher_rank (every block, rank "
        "in proportion to its score)",
    )
    fora.add_argument(
        "--steps",
        type=positive_int,
        default=tuned.steps,
        help="optimizer steps (default: 48, or from --epochs)",
    )
    fora.add_argument(
        "--epochs",
        type=positive_float,
        default=tuned.epochs,
        help="passes over the training split (instead of --steps)",
    )
    fora.add_argument(
        "--batch-size",
        type=positive_int,
        default=tuned.batch_size,
        help="examples per optimizer step, all processes together",
    )
    fora.add_argument(
        "--micro-batch-tokens",
        type=positive_int,
        default=tuned.micro_batch_tokens,
        help="the most padded tokens per forward pass on one process: each step is cut into "
        "passes within it and the gradients accumulated; bounds the peak memory (default: 128 "
        "on the CPU, the whole batch on CUDA)",
    )
    fora.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=tuned.precision,
        help="training precision (autocast; fp16 with loss scaling, CUDA only)",
    )
    fora.add_argument(
        "--save-every",
        type=positive_int,
        default=tuned.save_every,
        help="write <output>/checkpoint-<step>/ every N steps (Ctrl-C always writes one)",
    )
    fora.add_argument(
        "--eval-every",
        type=positive_int,
        default=tuned.eval_every,
        help="score the held-out examples every N steps (in metrics.jsonl)",
    )
    fora.add_argument(
        "--resume",
        default=None,
        metavar="CHECKPOINT",
        help="continue a run from its checkpoint-<step> folder (its settings are replayed; "
        "options given here override them)",
    )
    fora.add_argument(
        "--lr",
        type=positive_float,
        default=tuned.lr,
        help="one fixed AdamW learning rate for the Euclidean factor (lora_A with "
        "--stiefel-factor B) instead of the weight-scaled default (docs/fora.md)",
    )
    fora.add_argument(
        "--relative-lr",
        type=positive_float,
        default=tuned.relative_lr,
        help="give the Euclidean factor of each layer the rate RELATIVE_LR x RMS of the weight "
        f"it adapts (the default, at {DEFAULT_RELATIVE_LR:g}; with it, --lr is the rate of "
        "any other trainable parameter; docs/fora.md)",
    )
    fora.add_argument(
        "--stiefel-lr",
        type=positive_float,
        default=tuned.stiefel_lr,
        help="learning rate of the Stiefel factor (lora_B with --stiefel-factor B)",
    )
    fora.add_argument(
        "--lr-search",
        type=positive_float,
        nargs="+",
        default=tuned.lr_search,
        metavar="RATE",
        help="train once per RATE (A's and B's rates tied) for the whole schedule and keep the "
        "run with the lowest final training loss, instead of --lr / --stiefel-lr; costs about "
        "one run per rate (docs/cli.md)",
    )
    fora.add_argument(
        "--lr-search-seeds",
        type=positive_int,
        default=tuned.lr_search_seeds,
        metavar="N",
        help="with --lr-search, train each rate on N data orders (seeds --seed onwards) and keep "
        "the lowest mean final loss: one seed can favour a rate that collapses on another; "
        "costs N runs per rate",
    )
    fora.add_argument(
        "--train-examples",
        type=positive_int,
        default=tuned.train_examples,
        help="use at most this many training examples",
    )

    fisher = commands.add_parser(
        "fisher",
        help="score the blocks of a model on data and print the table (no training)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    scored = FisherSettings()
    _add_model_and_data(fisher, scored)
    fisher.add_argument(
        "--batch-size",
        type=positive_int,
        default=scored.batch_size,
        help="examples per scoring batch (the scores do not depend on it; the memory does)",
    )
    fisher.add_argument(
        "--budget",
        type=fraction,
        default=scored.budget,
        help="mark the top fraction of blocks as selected",
    )
    for command_parser in (finetune, fisher):
        command_parser.add_argument(
            "--config",
            default=None,
            metavar="RUN_CONFIG",
            help="replay the settings of a run_config.json; options given here override them",
        )
    merge_command.add_parser(commands)
    retractions_command.add_parser(commands)
    return parser, {"finetune": finetune, "fisher": fisher}


def _replayed(path: Path, command: str, drop: tuple[str, ...]) -> dict[str, Any]:
    """The settings stored in a ``run_config.json`` for ``command``, minus ``drop``.

    Raises:
        UsageError: an unreadable file, another command's settings, or unknown keys.
    """
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"--config {str(path)!r} cannot be read: {error}") from None
    if not isinstance(stored, dict) or stored.get("command", command) != command:
        raise UsageError(f"--config {str(path)!r} holds no settings of the {command} command")
    known = {item.name for item in fields(SETTINGS[command])}
    unknown = sorted(set(stored) - known - {"command"})
    if unknown:
        raise UsageError(f"--config {str(path)!r} has unknown settings {unknown}")
    return {key: value for key, value in stored.items() if key in known and key not in drop}


def _resume_config(checkpoint: str) -> Path | None:
    folder = Path(checkpoint).expanduser()
    for candidate in (folder / "run_config.json", folder.parent / "run_config.json"):
        if candidate.is_file():
            return candidate
    return None


def parse(argv: list[str] | None = None) -> tuple[str, Any]:
    """The command and its typed settings (argparse exits 2 on a malformed option).

    For ``finetune`` and ``fisher``, ``--config`` (or the run config of ``--resume``'s
    checkpoint) supplies the defaults; a resumed run keeps its folder unless ``--output`` is
    given.

    Raises:
        UsageError: an unreadable or foreign ``--config`` (``merge`` and ``retractions``
            check their own options here too).
    """
    parser, replayable = _build()
    arguments = parser.parse_args(argv)
    command = arguments.command
    if command == "merge":
        return command, merge_command.settings_from(arguments)
    if command == "retractions":
        return command, retractions_command.settings_from(arguments)
    config = Path(arguments.config) if arguments.config else None
    resume = getattr(arguments, "resume", None)
    if config is None and resume is not None:
        config = _resume_config(resume)
    if config is not None:
        drop = ("resume", "output") if resume is not None else ("resume",)
        replayable[command].set_defaults(**_replayed(config, command, drop))
        arguments = parser.parse_args(argv)
    settings_class = SETTINGS[command]
    values = {item.name: getattr(arguments, item.name) for item in fields(settings_class)}
    return command, settings_class(**values)
