"""The FoRA frontend: ``apply_fora``, ``FoRAConfig``, ``fora_optimizer`` and the report.

See ``docs/fora.md`` for the method, the defaults and how to load the adapter with peft alone.
"""

from stiefel_peft.fora.apply import apply_fora
from stiefel_peft.fora.config import FoRAConfig, number_of_selected_blocks
from stiefel_peft.fora.optimizer import constrained_parameters, fora_optimizer
from stiefel_peft.fora.report import REPORT_FILE, FoRAReport
from stiefel_peft.fora.targets import DEFAULT_TARGET_SCHEMES

__all__ = [
    "DEFAULT_TARGET_SCHEMES",
    "REPORT_FILE",
    "FoRAConfig",
    "FoRAReport",
    "apply_fora",
    "constrained_parameters",
    "fora_optimizer",
    "number_of_selected_blocks",
]
