"""The ``stiefel-peft`` command line (also ``python -m stiefel_peft``).

    stiefel-peft finetune    # SmolLM2-135M + Rotten Tomatoes with FoRA at budget 0.5
    stiefel-peft fisher      # score the blocks and print the table

A bad option stops with one line on stderr and exit code 2, before anything slow happens.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stiefel_peft.cli.arguments import UsageError, build_parser, check

__all__ = ["console_main", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)  # argparse itself exits 2 on a malformed option
    try:
        check(arguments)
        if arguments.command == "finetune":
            from stiefel_peft.cli.finetune import run
        else:
            from stiefel_peft.cli.fisher_command import run
        run(arguments)
    except UsageError as error:
        print(f"stiefel-peft {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


def console_main() -> None:
    """Entry point of the ``stiefel-peft`` console script."""
    sys.exit(main())
