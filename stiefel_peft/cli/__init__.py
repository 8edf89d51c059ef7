"""The application: the ``stiefel-peft`` command line (also ``python -m stiefel_peft``).

The library (``geometry``, ``optim``, ``fisher``, ``distributed``, ``fora``) never imports this
package; its data, encoding, scoring, loss and training helpers live here.

    stiefel-peft finetune       # SmolLM2-135M + Rotten Tomatoes with FoRA at budget 0.5
    stiefel-peft fisher         # score the blocks and print the table
    stiefel-peft merge ADAPTER  # the base with the adapter merged, a plain transformers model
    stiefel-peft retractions    # time and accuracy of every registered retraction

A bad option stops with one line on stderr and exit code 2, before anything slow happens;
Ctrl-C during training writes a checkpoint and exits with code 130 and the line that resumes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

__all__ = ["console_main", "main"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; 0 on success, 2 on a usage error, 130 when interrupted (one line on
    stderr for both)."""
    # bitsandbytes (imported by peft) warns on every start that an optional CPU kernel package
    # is missing; it falls back to its own kernel, so the line is only noise here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from stiefel_peft.cli.arguments import parse
    from stiefel_peft.cli.options import Interrupted, UsageError

    arguments = list(argv) if argv is not None else sys.argv[1:]
    command = next((a for a in arguments if not a.startswith("-")), "")
    try:
        command, settings = parse(arguments)
        if command in ("finetune", "fisher"):
            from stiefel_peft.cli.checks import check

            check(settings, command)
        if command == "finetune":
            from stiefel_peft.cli.finetune import run
        elif command == "fisher":
            from stiefel_peft.cli.fisher_command import run
        elif command == "merge":
            from stiefel_peft.cli.merge_command import run
        else:
            from stiefel_peft.cli.retractions_command import run
        run(settings)
    except UsageError as error:
        print(f"stiefel-peft {command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as error:
        print(f"stiefel-peft {command}: {error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(
            f"stiefel-peft {command}: interrupted before training started; nothing to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0


def console_main() -> None:
    """Entry point of the ``stiefel-peft`` console script."""
    sys.exit(main())
