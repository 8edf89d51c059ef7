"""The command line: options into typed settings, and the checks before any long work.

Every option's default is the settings' own (:mod:`stiefel_peft.cli.settings`, which reads the
library's); :func:`parse` returns the command and its settings. Every check here is cheap (no
model is loaded): a bad option stops the program with one line and exit code 2 before minutes
are spent loading and scoring.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from dataclasses import fields
from pathlib import Path

from stiefel_peft.cli.assets import BUILTIN_DATASETS, BUILTIN_MODELS, QUANTIZATIONS
from stiefel_peft.cli.settings import (
    DEFAULT_LABEL_NAMES,
    DataSettings,
    FinetuneSettings,
    FisherSettings,
)
from stiefel_peft.fisher import ESTIMATORS
from stiefel_peft.fora import INITIALISATIONS
from stiefel_peft.geometry import RETRACTIONS

SETTINGS = {"finetune": FinetuneSettings, "fisher": FisherSettings}


class UsageError(Exception):
    """A bad option: reported as one line with exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (and exit code 2), not the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _add_model_and_data(parser: argparse.ArgumentParser, defaults: DataSettings) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument(
        "--model",
        default=defaults.model,
        help=f"a built-in model ({', '.join(sorted(BUILTIN_MODELS))}) or a local Hugging Face "
        "folder of a causal LM (default: %(default)s)",
    )
    group.add_argument(
        "--data",
        default=defaults.data,
        help=f"a built-in data set ({', '.join(sorted(BUILTIN_DATASETS))}) or a .csv/.jsonl file "
        "with text and label columns, or prompt and completion columns (default: %(default)s)",
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
        type=_positive_int,
        default=defaults.max_length,
        help="tokens per example, the review text is truncated (default: %(default)s)",
    )
    group.add_argument(
        "--heldout",
        type=_non_negative_int,
        default=defaults.heldout,
        help="held-out examples for the accuracy before and after (default: %(default)s)",
    )
    group.add_argument(
        "--calibration-examples",
        type=_positive_int,
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
    parser = OneLineParser(
        prog="stiefel-peft",
        description="FoRA: Fisher-selected blocks + LoRA with an orthonormal factor.",
    )
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
        type=_fraction,
        default=tuned.budget,
        help="fraction of blocks adapted, in (0, 1]",
    )
    fora.add_argument("--rank", type=_positive_int, default=tuned.rank, help="LoRA rank r")
    fora.add_argument(
        "--alpha", type=_positive_float, default=tuned.alpha, help="LoRA alpha (scaling alpha / r)"
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
        "--steps",
        type=_positive_int,
        default=tuned.steps,
        help="optimizer steps (default: 48, or from --epochs)",
    )
    fora.add_argument(
        "--epochs",
        type=_positive_float,
        default=tuned.epochs,
        help="passes over the training split (instead of --steps)",
    )
    fora.add_argument(
        "--batch-size", type=_positive_int, default=tuned.batch_size, help="examples per step"
    )
    fora.add_argument(
        "--lr",
        type=_positive_float,
        default=tuned.lr,
        help="AdamW learning rate of the Euclidean factor (lora_A with --stiefel-factor B)",
    )
    fora.add_argument(
        "--stiefel-lr",
        type=_positive_float,
        default=tuned.stiefel_lr,
        help="learning rate of the Stiefel factor (lora_B with --stiefel-factor B)",
    )
    fora.add_argument(
        "--train-examples",
        type=_positive_int,
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
        type=_positive_int,
        default=scored.batch_size,
        help="examples per scoring batch",
    )
    fisher.add_argument(
        "--budget",
        type=_fraction,
        default=scored.budget,
        help="mark the top fraction of blocks as selected",
    )
    return parser


def parse(argv: list[str] | None = None) -> tuple[str, DataSettings]:
    """The command and its typed settings (argparse exits 2 on a malformed option)."""
    arguments = build_parser().parse_args(argv)
    settings_class = SETTINGS[arguments.command]
    values = {item.name: getattr(arguments, item.name) for item in fields(settings_class)}
    return arguments.command, settings_class(**values)


def resolve_output(settings: DataSettings, command: str) -> Path:
    """The output folder: ``settings.output``, else ``runs/<command>-<date>-<time>``."""
    if settings.output is not None:
        return Path(settings.output)
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def check(settings: DataSettings, command: str) -> None:
    """The checks argparse cannot do; raise :class:`UsageError` with one line.

    Last, the output folder is resolved once (``settings.output`` is set to it) and created.
    """
    if settings.model not in BUILTIN_MODELS:
        folder = Path(settings.model).expanduser()
        if not folder.is_dir():
            raise UsageError(
                f"--model {settings.model!r} is neither a built-in model "
                f"({', '.join(sorted(BUILTIN_MODELS))}) nor an existing folder"
            )
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"--model folder {str(folder)!r} has no config.json (not a Hugging Face folder)"
            )
    if settings.data not in BUILTIN_DATASETS:
        path = Path(settings.data)
        if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
            raise UsageError(
                f"--data {settings.data!r} is neither a built-in data set "
                f"({', '.join(sorted(BUILTIN_DATASETS))}) nor a .csv/.jsonl file"
            )
        if not path.is_file():
            raise UsageError(f"--data file {settings.data!r} does not exist")
    if "{text}" not in settings.template:
        raise UsageError("--template must contain {text}")
    if isinstance(settings, FinetuneSettings):
        if settings.steps is not None and settings.epochs is not None:
            raise UsageError("give --steps or --epochs, not both")
        if not 0 <= settings.dropout < 1:
            raise UsageError(f"--dropout must be in [0, 1), got {settings.dropout}")
    if settings.quantize is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(
            f"--quantize {settings.quantize} needs bitsandbytes: pip install "
            "'stiefel_peft[quantization]' (or pip install bitsandbytes)"
        )
    device = settings.device
    if device != "auto" and not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} asked for CUDA, but torch sees no CUDA device")
    settings.output = str(prepare_output(resolve_output(settings, command)))


def prepare_output(output: Path) -> Path:
    """Create the output folder now, before any model loads, so that a path that cannot be
    written fails in a second, not after the training (one line, exit 2).

    Raises:
        UsageError: the folder exists and is not empty, or cannot be created (a path under a
            regular file, a read-only or virtual file system, no permission).
    """
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {str(output)!r} exists and is a file; pick a new directory")
    if output.is_dir() and any(output.iterdir()):
        raise UsageError(f"--output {str(output)!r} exists and is not empty; pick a new directory")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".stiefel-peft-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UsageError(f"--output {str(output)!r} cannot be created: {reason}") from None
    return output
