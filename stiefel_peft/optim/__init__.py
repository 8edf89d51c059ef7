"""Optimizers on the Stiefel manifold with the torch.optim contract.

:class:`StiefelAdam` and :class:`StiefelSGD` step Stiefel parameters (batched by shape, O(n p^2),
float32 master copies for half dtypes) and behave exactly like ``torch.optim.AdamW`` /
``torch.optim.SGD`` on the other groups; :class:`RiemannianWrapper` makes any torch optimizer
Riemannian for research. Pure bucket step functions live in :mod:`.functional`.
See ``docs/optim.md``.
"""

from .adam import StiefelAdam
from .functional import SECOND_MOMENTS
from .sgd import StiefelSGD
from .wrapper import RiemannianWrapper

__all__ = ["SECOND_MOMENTS", "RiemannianWrapper", "StiefelAdam", "StiefelSGD"]
