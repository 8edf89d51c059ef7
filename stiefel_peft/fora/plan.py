"""The plan of a FoRA adapter: which blocks, which layers, how many parameters.

``apply_fora`` is ``score -> plan -> inject -> initialise`` (see :mod:`stiefel_peft.fora.apply`);
this module holds the plan step. A researcher recombines the steps: plan once, then select
blocks by a Fisher ranking (:meth:`FoRAPlan.select_top`), by any rule
(:meth:`FoRAPlan.with_blocks`), or pick single layers (:meth:`FoRAPlan.with_modules`), and
hand the plan to :func:`~stiefel_peft.fora.inject.inject_adapters`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from torch import nn

from stiefel_peft.fisher import BlockList, find_blocks
from stiefel_peft.fisher.blocks import layer_features
from stiefel_peft.fora.config import FoRAConfig, number_of_selected_blocks
from stiefel_peft.fora.targets import resolve_targets

__all__ = ["FoRAPlan", "plan_fora", "select_top_blocks"]


def select_top_blocks(per_block: Mapping[int, float], count: int) -> list[int]:
    """The ``count`` highest-scoring block indices, ascending (ties: the lower index wins)."""
    ranking = sorted(per_block, key=lambda index: (-per_block[index], index))
    return sorted(ranking[:count])


@dataclass(frozen=True)
class FoRAPlan:
    """Where a FoRA adapter goes, before anything is injected.

    Attributes:
        blocks: the model's block list.
        patterns: the target patterns in use (relative to a block).
        per_block: block index -> the exact module names the patterns match in it.
        features: module name -> ``(d_in, d_out)`` of every target layer.
        count: how many blocks the budget allows (``K = max(1, floor(L * budget))``).
        selected_blocks: the chosen blocks, ascending (empty until selected).
        adapted_modules: the exact names that get an adapter (the targets of the selected
            blocks, or the modules chosen one by one).
        ranks: module name -> its rank where it differs from ``config.r`` (empty: uniform).
    """

    blocks: BlockList
    patterns: tuple[str, ...]
    per_block: dict[int, list[str]]
    features: dict[str, tuple[int, int]]
    count: int
    selected_blocks: tuple[int, ...] = ()
    adapted_modules: tuple[str, ...] = field(default=())
    ranks: Mapping[str, int] = field(default_factory=dict)

    @property
    def needs_scores(self) -> bool:
        """Whether choosing the blocks needs a ranking (fewer than every block is kept)."""
        return self.count < self.blocks.length

    def with_blocks(self, blocks: Iterable[int]) -> FoRAPlan:
        """The plan with these blocks selected (any rule: Fisher top, random, bottom, ...).

        Raises:
            ValueError: an index outside ``0 .. L-1``, or no block.
        """
        chosen = sorted(set(int(index) for index in blocks))
        bad = [index for index in chosen if not 0 <= index < self.blocks.length]
        if bad or not chosen:
            raise ValueError(
                f"blocks must be a non-empty set of indices in 0..{self.blocks.length - 1}, "
                f"got {sorted(blocks)}"
            )
        adapted = tuple(name for index in chosen for name in self.per_block[index])
        return replace(self, selected_blocks=tuple(chosen), adapted_modules=adapted, ranks={})

    def select_top(self, per_block: Mapping[int, float]) -> FoRAPlan:
        """The plan with the ``count`` best blocks by ``per_block`` scores selected."""
        return self.with_blocks(select_top_blocks(per_block, self.count))

    def with_modules(self, names: Iterable[str]) -> FoRAPlan:
        """The plan with exactly these target layers adapted (selection per module).

        Raises:
            ValueError: a name that is not one of the plan's target layers.
        """
        wanted = set(names)
        unknown = sorted(wanted - set(self.features))
        if unknown or not wanted:
            raise ValueError(
                f"modules must be target layers of the plan, e.g. {list(self.features)[:3]}; "
                f"not {unknown[:5]}"
            )
        ordered = tuple(name for name in self.features if name in wanted)  # model order
        blocks = tuple(sorted({self.blocks.index_of(name) for name in ordered}))
        return replace(self, selected_blocks=blocks, adapted_modules=ordered, ranks={})

    def with_ranks(self, ranks: Mapping[str, int]) -> FoRAPlan:
        """The plan with these adapted layers at their own rank (the others at ``config.r``).

        Raises:
            ValueError: a name that is not adapted, or a rank below 1.
        """
        unknown = sorted(set(ranks) - set(self.adapted_modules))
        bad = {name: rank for name, rank in ranks.items() if int(rank) < 1}
        if unknown or bad:
            raise ValueError(
                f"ranks must name adapted layers with ranks >= 1; unknown {unknown[:3]}, "
                f"bad {dict(list(bad.items())[:3])}"
            )
        return replace(self, ranks={name: int(rank) for name, rank in ranks.items()})

    def rank_of(self, name: str, r: int) -> int:
        """The rank of adapted layer ``name``: its own, else ``r``."""
        return self.ranks.get(name, r)

    def parameters(self, r: int, names: Iterable[str] | None = None) -> int:
        """LoRA parameters ``rank (d_in + d_out)`` summed over ``names`` (default: the
        adapted), each at :meth:`rank_of` (``r`` for names without their own)."""
        chosen = self.adapted_modules if names is None else names
        return sum(self.rank_of(name, r) * sum(self.features[name]) for name in chosen)

    def lora_equivalent(self, r: int) -> int:
        """The parameters of LoRA with the same r and targets on every block."""
        return sum(r * sum(self.features[name]) for name in self.features)


def plan_fora(model: nn.Module, config: FoRAConfig) -> FoRAPlan:
    """Find the blocks and the target layers of ``model`` for ``config`` (nothing selected).

    With ``budget=1`` every block is selected at once (nothing needs a ranking).

    Raises:
        ValueError: a model without a block list, targets that match nothing, or ``r`` larger
            than a constrained dimension (``lora_B`` needs ``d_out >= r``, ``lora_A``
            ``d_in >= r``).
    """
    blocks = find_blocks(model)
    patterns, per_block = resolve_targets(model, blocks, config.target_modules)
    modules = dict(model.named_modules())
    features = {
        name: layer_features(_base_layer(modules[name]))
        for names in per_block.values()
        for name in names
    }
    _check_rank(features, config)
    count = number_of_selected_blocks(blocks.length, config.budget)
    plan = FoRAPlan(blocks, tuple(patterns), per_block, features, count)
    return plan if plan.needs_scores else plan.with_blocks(range(blocks.length))


def _base_layer(module: nn.Module) -> nn.Module:
    """The linear layer itself, also when a peft adapter already wraps it."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _check_rank(features: dict[str, tuple[int, int]], config: FoRAConfig) -> None:
    position = 1 if config.stiefel_factor == "B" else 0  # d_out for lora_B, d_in for lora_A
    smallest = min(features, key=lambda name: features[name][position])
    size = features[smallest][position]
    if config.r > size:
        attribute = "out_features" if position else "in_features"
        factor = "lora_B (d_out x r)" if config.stiefel_factor == "B" else "lora_A (r x d_in)"
        kind = "columns" if config.stiefel_factor == "B" else "rows"
        raise ValueError(
            f"`r`={config.r} is larger than {attribute}={size} of {smallest!r}: {factor} cannot "
            f"have {config.r} orthonormal {kind}; use r <= {size} or drop that module from "
            "target_modules"
        )
