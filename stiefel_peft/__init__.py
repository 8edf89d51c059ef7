"""stiefel_peft: optimization on the Stiefel manifold and FoRA for parameter-efficient fine-tuning.

The public API is small; everything else lives in the subpackages ``geometry``, ``optim``,
``fisher`` and ``fora``. The frontend names (``apply_fora``, ``FoRAConfig``,
``fora_optimizer``, ``estimate_fisher``, ``FisherScores``) are imported on first use, so that
``from stiefel_peft import StiefelAdam`` does not import peft and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stiefel_peft.geometry import (
    RETRACTIONS,
    Stiefel,
    orthogonality_error,
    orthonormalize,
    random_stiefel,
    register_retraction,
    retract,
)
from stiefel_peft.optim import RiemannianWrapper, StiefelAdam, StiefelSGD

if TYPE_CHECKING:
    from stiefel_peft.fisher import FisherScores, estimate_fisher
    from stiefel_peft.fora import FoRAConfig, apply_fora, fora_optimizer

__version__ = "0.1.0"

_LAZY = {
    "FisherScores": "stiefel_peft.fisher",
    "estimate_fisher": "stiefel_peft.fisher",
    "FoRAConfig": "stiefel_peft.fora",
    "apply_fora": "stiefel_peft.fora",
    "fora_optimizer": "stiefel_peft.fora",
}

__all__ = [
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
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stiefel_peft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
