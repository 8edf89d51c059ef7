"""The command line: options with their defaults, and the checks that run before any long work.

Every check here is cheap (no model is loaded): a bad option stops the program with one line and
exit code 2 before minutes are spent loading and scoring.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from stiefel_peft.cli.assets import BUILTIN_DATASETS, BUILTIN_MODELS
from stiefel_peft.fisher import ESTIMATORS
from stiefel_peft.geometry import RETRACTIONS

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATA = "rotten-tomatoes"
DEFAULT_LABEL_NAMES = "negative,positive"


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


def _add_model_and_data(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and data")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a built-in model ({', '.join(sorted(BUILTIN_MODELS))}) or a local Hugging Face "
        "folder of a causal LM (default: %(default)s)",
    )
    group.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"a built-in data set ({', '.join(sorted(BUILTIN_DATASETS))}) or a .csv/.jsonl file "
        "with text and label columns, or prompt and completion columns (default: %(default)s)",
    )
    group.add_argument(
        "--text-column", default="text", help="text column of a file (default: %(default)s)"
    )
    group.add_argument(
        "--label-column", default="label", help="label column of a file (default: %(default)s)"
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
        "--completion-column", default="completion", help="completion column (default: %(default)s)"
    )
    group.add_argument(
        "--template",
        default="Review: {text}\nSentiment (positive or negative):",
        help="prompt template for text/label data; {text} is replaced (default: %(default)r)",
    )
    group.add_argument(
        "--max-length",
        type=_positive_int,
        default=96,
        help="tokens per example, the review text is truncated (default: %(default)s)",
    )
    group.add_argument(
        "--heldout",
        type=_non_negative_int,
        default=300,
        help="held-out examples for the accuracy before and after (default: %(default)s)",
    )
    group.add_argument(
        "--calibration-examples",
        type=_positive_int,
        default=64,
        help="training examples scored by the Fisher pass (default: %(default)s)",
    )
    group.add_argument(
        "--estimator",
        choices=list(ESTIMATORS),
        default="empirical",
        help="Fisher estimator (default: %(default)s)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split, the initialisation and the data order (default: %(default)s)",
    )
    group.add_argument(
        "--device",
        default="auto",
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
    _add_model_and_data(finetune)
    fora = finetune.add_argument_group("FoRA and training")
    fora.add_argument(
        "--budget", type=_fraction, default=0.5, help="fraction of blocks adapted, in (0, 1]"
    )
    fora.add_argument("--rank", type=_positive_int, default=32, help="LoRA rank r")
    fora.add_argument(
        "--alpha", type=_positive_float, default=64.0, help="LoRA alpha (scaling alpha / r)"
    )
    fora.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    fora.add_argument(
        "--retraction",
        choices=sorted(RETRACTIONS),
        default="cayley",
        help="retraction of the Stiefel step",
    )
    fora.add_argument(
        "--stiefel-factor", choices=("B", "A"), default="B", help="the factor kept orthonormal"
    )
    fora.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="optimizer steps (default: 48, or from --epochs)",
    )
    fora.add_argument(
        "--epochs",
        type=_positive_float,
        default=None,
        help="passes over the training split (instead of --steps)",
    )
    fora.add_argument("--batch-size", type=_positive_int, default=16, help="examples per step")
    fora.add_argument(
        "--lr", type=_positive_float, default=2e-3, help="AdamW learning rate of lora_A"
    )
    fora.add_argument(
        "--stiefel-lr",
        type=_positive_float,
        default=2e-3,
        help="learning rate of the Stiefel factor",
    )
    fora.add_argument(
        "--train-examples",
        type=_positive_int,
        default=None,
        help="use at most this many training examples",
    )

    fisher = commands.add_parser(
        "fisher",
        help="score the blocks of a model on data and print the table (no training)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_and_data(fisher)
    fisher.add_argument(
        "--batch-size", type=_positive_int, default=8, help="examples per scoring batch"
    )
    fisher.add_argument(
        "--budget", type=_fraction, default=0.5, help="mark the top fraction of blocks as selected"
    )
    return parser


def resolve_output(arguments: argparse.Namespace) -> Path:
    if arguments.output is not None:
        return Path(arguments.output)
    return Path("runs") / f"{arguments.command}-{time.strftime('%Y%m%d-%H%M%S')}"


def check(arguments: argparse.Namespace) -> None:
    """The checks argparse cannot do; raise :class:`UsageError` with one line."""
    if arguments.model not in BUILTIN_MODELS:
        folder = Path(arguments.model).expanduser()
        if not folder.is_dir():
            raise UsageError(
                f"--model {arguments.model!r} is neither a built-in model "
                f"({', '.join(sorted(BUILTIN_MODELS))}) nor an existing folder"
            )
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"--model folder {str(folder)!r} has no config.json (not a Hugging Face folder)"
            )
    if arguments.data not in BUILTIN_DATASETS:
        path = Path(arguments.data)
        if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
            raise UsageError(
                f"--data {arguments.data!r} is neither a built-in data set "
                f"({', '.join(sorted(BUILTIN_DATASETS))}) nor a .csv/.jsonl file"
            )
        if not path.is_file():
            raise UsageError(f"--data file {arguments.data!r} does not exist")
    if "{text}" not in arguments.template:
        raise UsageError("--template must contain {text}")
    if (
        getattr(arguments, "steps", None) is not None
        and getattr(arguments, "epochs", None) is not None
    ):
        raise UsageError("give --steps or --epochs, not both")
    if (
        getattr(arguments, "dropout", 0.0) is not None
        and not 0 <= getattr(arguments, "dropout", 0.0) < 1
    ):
        raise UsageError(f"--dropout must be in [0, 1), got {arguments.dropout}")
    device = arguments.device
    if device != "auto" and not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} asked for CUDA, but torch sees no CUDA device")
    arguments.output = str(prepare_output(resolve_output(arguments)))


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
