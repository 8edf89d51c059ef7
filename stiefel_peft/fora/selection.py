"""How the Fisher scores turn into an adapter plan: named selections (a registry).

``FoRAConfig(selection=...)`` picks one; every entry spends the same parameter budget, the
parameters of LoRA at rank ``r`` on ``K = floor(L * budget)`` blocks:

- ``"top_blocks"`` (default, the paper): the ``K`` blocks with the highest scores, every target
  layer of each at rank ``r``.
- ``"top_modules"``: target layers chosen one by one, in order of Fisher score per adapter
  parameter, until the budget is spent. *Hypothesis*: the Fisher mass is not spread evenly over
  a block's layers (one layer type can carry most of it in many blocks), so a per-layer choice
  buys more score for the same parameters than whole blocks.
- ``"random_blocks"``: ``K`` blocks drawn uniformly (seeded by ``config.seed``): the control a
  Fisher selection has to beat.
- ``"fisher_rank"``: every block keeps an adapter, with rank proportional to its score (the
  ranks sum to ``K r``, capped at ``2 r``; a block whose share rounds to 0 gets none).
  *Hypothesis*: a hard top-half cut throws away blocks that still matter (in the first quality
  round a random half beat the Fisher half on arithmetic); a soft allocation keeps some rank
  everywhere and the most where the score is.

A selection is ``function(plan, scores, config) -> plan``; researchers add their own with
:func:`register_selection`. Module scores are matched to the plan's layer names by suffix, so
scores taken on a ``PeftModel`` (names under ``base_model.model.``) work too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: the plan and config modules import this registry
    from stiefel_peft.fora.config import FoRAConfig
    from stiefel_peft.fora.plan import FoRAPlan

__all__ = ["SELECTIONS", "layer_scores", "register_selection", "select"]

Selection = Callable[..., "FoRAPlan"]
SELECTIONS: dict[str, Selection] = {}
RANK_CAP = 2  # fisher_rank: no block above RANK_CAP * r


def register_selection(name: str, *, replace: bool = False) -> Callable[[Selection], Selection]:
    """Decorator adding ``function(plan, scores, config) -> FoRAPlan`` to :data:`SELECTIONS`
    (``scores``: a :class:`~stiefel_peft.fisher.FisherScores` of the model).

    Raises:
        ValueError: ``name`` is empty, or taken and ``replace`` is False.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    if name in SELECTIONS and not replace:
        raise ValueError(f"a selection named {name!r} is already registered")

    def decorator(function: Selection) -> Selection:
        SELECTIONS[name] = function
        return function

    return decorator


def select(plan: FoRAPlan, scores: Any, config: FoRAConfig) -> FoRAPlan:
    """``SELECTIONS[config.selection](plan, scores, config)``.

    Raises:
        ValueError: an unknown selection (the message lists the registered ones).
    """
    if config.selection not in SELECTIONS:
        raise ValueError(
            f"`selection` must be one of {sorted(SELECTIONS)}, got {config.selection!r} (add "
            "your own with stiefel_peft.fora.register_selection)"
        )
    return SELECTIONS[config.selection](plan, scores, config)


def layer_scores(plan: FoRAPlan, per_module: Mapping[str, float]) -> dict[str, float]:
    """The score of each of the plan's target layers, from scores keyed by the scored model's
    module names (``name``, ``<prefix>.name`` or ``<prefix>.name.base_layer``).

    Raises:
        ValueError: a target layer without a score.
    """
    by_suffix: dict[str, float] = {}
    for key, value in per_module.items():
        by_suffix[key.removesuffix(".base_layer")] = value
    result = {}
    for name in plan.features:
        matches = [v for k, v in by_suffix.items() if k == name or k.endswith("." + name)]
        if len(matches) != 1:
            raise ValueError(
                f"no single Fisher score for target layer {name!r} ({len(matches)} matches); "
                "score the same model the plan was made for"
            )
        result[name] = float(matches[0])
    return result


@register_selection("top_blocks")
def top_blocks(plan: FoRAPlan, scores: Any, config: FoRAConfig) -> FoRAPlan:
    """The ``K`` best blocks by their summed Fisher score (the paper's rule)."""
    return plan.select_top(scores.per_block)


@register_selection("random_blocks")
def random_blocks(plan: FoRAPlan, scores: Any, config: FoRAConfig) -> FoRAPlan:
    """``K`` blocks drawn uniformly without replacement, seeded by ``config.seed``."""
    generator = random.Random(config.seed)
    return plan.with_blocks(generator.sample(range(plan.blocks.length), plan.count))


@register_selection("top_modules")
def top_modules(plan: FoRAPlan, scores: Any, config: FoRAConfig) -> FoRAPlan:
    """Target layers by Fisher score per adapter parameter, within the ``K``-block budget.

    Greedy: in order of ``score / (r (d_in + d_out))`` (ties: model order), a layer is taken
    when it still fits the budget; at least the best layer is taken.
    """
    values = layer_scores(plan, scores.per_module)
    budget = plan.count * plan.parameters(config.r, plan.per_block[0])
    order = sorted(
        plan.features,
        key=lambda name: -values[name] / (config.r * sum(plan.features[name])),
    )
    chosen: list[str] = []
    spent = 0
    for name in order:
        cost = config.r * sum(plan.features[name])
        if spent + cost <= budget or not chosen:
            chosen.append(name)
            spent += cost
    return plan.with_modules(chosen)


def proportional_ranks(
    weights: Mapping[int, float], total: int, cap: int
) -> dict[int, int]:  # fmt: skip
    """Integer ranks proportional to ``weights`` that sum to ``total`` (largest remainders),
    none above ``cap``; negative or zero weights get 0.

    Raises:
        ValueError: ``total`` exceeds ``cap`` times the number of positive weights.
    """
    positive = {key: max(0.0, float(value)) for key, value in weights.items()}
    if sum(positive.values()) <= 0:
        positive = dict.fromkeys(weights, 1.0)  # no signal: spread evenly
    keys = [key for key, value in positive.items() if value > 0]
    if total > cap * len(keys):
        raise ValueError(f"cannot give {total} ranks to {len(keys)} blocks of at most {cap}")
    ranks = dict.fromkeys(weights, 0)
    remaining, open_keys = total, set(keys)
    while remaining > 0 and open_keys:  # water-filling: capped keys hand their share on
        mass = sum(positive[key] for key in open_keys)
        shares = {key: remaining * positive[key] / mass for key in open_keys}
        floors = {key: min(cap - ranks[key], math.floor(shares[key])) for key in open_keys}
        for key, value in floors.items():
            ranks[key] += value
        remaining -= sum(floors.values())
        open_keys = {key for key in open_keys if ranks[key] < cap}
        if remaining and not any(floors.values()):
            order = sorted(open_keys, key=lambda key: (-(shares[key] % 1), key))
            for key in order[:remaining]:
                ranks[key] += 1
            remaining -= min(remaining, len(order))
    return ranks


@register_selection("fisher_rank")
def fisher_rank(plan: FoRAPlan, scores: Any, config: FoRAConfig) -> FoRAPlan:
    """Every block, rank proportional to its Fisher score, ranks summing to ``K r`` (at most
    ``2 r`` per block, bounded by the layers' constrained dimension)."""
    position = 1 if config.stiefel_factor == "B" else 0
    smallest = min(size[position] for size in plan.features.values())
    cap = min(RANK_CAP * config.r, smallest)
    total = min(plan.count * config.r, cap * plan.blocks.length)
    ranks = proportional_ranks(scores.per_block, total, cap)
    kept = [index for index, rank in ranks.items() if rank > 0]
    planned = plan.with_blocks(kept)
    per_module = {
        name: ranks[index] for index in kept for name in plan.per_block[index]
    }  # fmt: skip
    return planned.with_ranks(per_module)
