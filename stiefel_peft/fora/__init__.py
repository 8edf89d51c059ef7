"""The FoRA frontend: ``apply_fora`` and its public steps, ``FoRAConfig``, ``fora_optimizer``.

``apply_fora`` = plan (:func:`plan_fora`) -> score (:func:`score_blocks`) -> select
(:func:`select`, a registry of named selections) -> inject (:func:`inject_adapters`) ->
initialise (:func:`initialise_adapters`, a registry of named initialisations). See
``docs/fora.md``.
"""

from stiefel_peft.fora.apply import apply_fora
from stiefel_peft.fora.config import (
    DEFAULT_LR,
    DEFAULT_RELATIVE_LR,
    DEFAULT_STIEFEL_LR,
    FoRAConfig,
    number_of_selected_blocks,
)
from stiefel_peft.fora.initialise import (
    INITIALISATIONS,
    initialise_adapters,
    register_initialisation,
)
from stiefel_peft.fora.inject import inject_adapters
from stiefel_peft.fora.optimizer import (
    constrained_parameters,
    detect_stiefel_factor,
    fora_optimizer,
)
from stiefel_peft.fora.plan import FoRAPlan, plan_fora, select_top_blocks
from stiefel_peft.fora.quantized import prepare_quantized
from stiefel_peft.fora.rates import weight_rms, weight_scaled_rates
from stiefel_peft.fora.report import REPORT_FILE, FoRAReport
from stiefel_peft.fora.scoring import score_blocks
from stiefel_peft.fora.selection import SELECTIONS, register_selection, select
from stiefel_peft.fora.settings import SETTINGS_FILE, load_fora_adapter
from stiefel_peft.fora.targets import DEFAULT_TARGET_SCHEMES

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_RELATIVE_LR",
    "DEFAULT_STIEFEL_LR",
    "DEFAULT_TARGET_SCHEMES",
    "INITIALISATIONS",
    "REPORT_FILE",
    "SELECTIONS",
    "SETTINGS_FILE",
    "FoRAConfig",
    "FoRAPlan",
    "FoRAReport",
    "apply_fora",
    "constrained_parameters",
    "detect_stiefel_factor",
    "fora_optimizer",
    "initialise_adapters",
    "inject_adapters",
    "load_fora_adapter",
    "number_of_selected_blocks",
    "plan_fora",
    "prepare_quantized",
    "register_initialisation",
    "register_selection",
    "score_blocks",
    "select",
    "select_top_blocks",
    "weight_rms",
    "weight_scaled_rates",
]
