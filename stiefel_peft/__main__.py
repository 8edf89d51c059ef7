"""``python -m stiefel_peft``: the command line."""

import sys

from stiefel_peft.cli import main

sys.exit(main())
