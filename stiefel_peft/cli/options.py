"""The command line's shared pieces: its two errors, the one-line parser, option types and
the output folder, which every command resolves and creates before anything slow happens."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = [
    "Interrupted",
    "OneLineParser",
    "UsageError",
    "fraction",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "prepare_output",
    "resolve_output",
]


class UsageError(Exception):
    """A bad option: reported as one line with exit code 2."""


class Interrupted(Exception):
    """Ctrl-C stopped a run: reported as one line (how to resume) with exit code 130."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (and exit code 2), not the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def resolve_output(output: str | None, command: str) -> Path:
    """The output folder: ``output``, else ``runs/<command>-<date>-<time>``."""
    if output is not None:
        return Path(output)
    return Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"


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
