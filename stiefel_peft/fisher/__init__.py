"""Fisher-information scores of the linear layers of a transformer, per module and per block.

Public API::

    estimate_fisher(model, batches, estimator="empirical", *, modules=None, num_samples=1,
                    seed=0, max_batches=None, progress=False) -> FisherScores
    ESTIMATORS, Estimator, register_estimator   # the registry: add your own estimator
    find_blocks(model) -> BlockList;  block_index(module_name, blocks) -> int | None
"""

from stiefel_peft.fisher.blocks import BlockList, block_index, find_blocks, linear_modules
from stiefel_peft.fisher.estimate import estimate_fisher
from stiefel_peft.fisher.estimators import ESTIMATORS, Estimator, register_estimator
from stiefel_peft.fisher.scores import FisherScores

__all__ = [
    "ESTIMATORS",
    "BlockList",
    "Estimator",
    "FisherScores",
    "block_index",
    "estimate_fisher",
    "find_blocks",
    "linear_modules",
    "register_estimator",
]
