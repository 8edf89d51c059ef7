"""The public API is small and explicit: pin it, and check every name resolves."""

from __future__ import annotations

import subprocess
import sys

import stiefel_peft

PUBLIC = {
    "RETRACTIONS",
    "FisherScores",
    "FoRAConfig",
    "RiemannianWrapper",
    "Stiefel",
    "StiefelAdam",
    "StiefelSGD",
    "__version__",
    "apply_fora",
    "estimate_fisher",
    "fora_optimizer",
    "orthogonality_error",
    "orthonormalize",
    "random_stiefel",
    "register_retraction",
    "retract",
}


def test_all_is_pinned_and_resolves() -> None:
    assert set(stiefel_peft.__all__) == PUBLIC
    for name in stiefel_peft.__all__:
        assert getattr(stiefel_peft, name) is not None


def test_importing_the_optimizer_does_not_import_the_frontend() -> None:
    code = (
        "import sys, stiefel_peft; print('peft' in sys.modules, 'stiefel_peft.fora' in sys.modules)"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert output.stdout.split() == ["False", "False"]
