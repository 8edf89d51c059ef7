"""The application: the ``stiefel-peft`` command line (also ``python -m stiefel_peft``).

The library (``geometry``, ``optim``, ``fisher``, ``distributed``, ``fora``) never imports this
package; its data, encoding, scoring, loss and training helpers live here.

    stiefel-peft finetune    # SmolLM2-135M + Rotten Tomatoes with FoRA at budget 0.5
    stiefel-peft fisher      # score the blocks and print the table

A bad option stops with one line on stderr and exit code 2, before anything slow happens.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stiefel_peft.cli.arguments import UsageError, check, parse

__all__ = ["console_main", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; 0 on success, 2 (and one line on stderr) on a usage error."""
    command, settings = parse(list(argv) if argv is not None else None)
    try:
        check(settings, command)
        if command == "finetune":
            from stiefel_peft.cli.finetune import run
        else:
            from stiefel_peft.cli.fisher_command import run
        run(settings)
    except UsageError as error:
        print(f"stiefel-peft {command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def console_main() -> None:
    """Entry point of the ``stiefel-peft`` console script."""
    sys.exit(main())
