"""``finetune --lr-search``: the rate check that docs/fora.md recommends, as one option.

No fixed rate for FoRA's free factor is within 2 points of the best on every task of the quality
study (docs/results.md, round 2, item 3): the best rates are 16 times apart. Among each task's
swept rates, the one with the lowest final training loss was within 2 points of the best on all
ten cells (on four of them predicted before their runs; a rate added later between two grid
points beat it by 2.3 on one cell over 5 seeds, with a tied loss), and it needs no held-out
split. So the search trains the adapter once per candidate rate, for the full schedule, from the
same start (the same blocks, the same initial factors, the same data order and dropout seed),
with A's and B's rates tied as in the study, and keeps the run whose training loss ends lowest:
the mean of the last :data:`LOSS_WINDOW` logged losses (a run whose loss is not finite never
wins). The held-out examples are not read. A quarter-length search was tested and failed one
cell in seven, so every candidate runs the full schedule: the search costs about one run per
rate. A pick at the edge of the grid says that the best rate may lie beyond it (on Gemma-3-270M
arithmetic the grid 2.5e-4 to 2e-3 picked 2.5e-4, 3.2 points short of 1.25e-4 below it), so the
search names the rate to add.

One seed sees one run per rate, and a rate that lands well on it can collapse on another: on the
study's out-of-sample cell (Gemma-3-270M, family relationships) seed 0's lowest loss picked
1e-3, 10.9 points short of the best, while the lowest mean over three seeds picked the best.
``seeds=k`` (``--lr-search-seeds``) trains each rate on ``k`` data orders and dropout draws
(training seeds ``plan.seed`` to ``plan.seed + k - 1``, the adapter's start unchanged) and
compares the mean of their final losses; the adapter kept is the chosen rate's run on
``plan.seed``. The study's seeds also drew B's initial frame, which these repeats do not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stiefel_peft.cli.trainer import FitResult, TrainingPlan, fit
from stiefel_peft.fora import fora_optimizer
from stiefel_peft.fora.optimizer import active_adapter
from stiefel_peft.fora.settings import attach_settings

__all__ = [
    "LOSS_WINDOW", "SEARCH_FOLDER", "RateSearch", "final_loss", "grid_edge", "mean_loss",
    "search_rates",
]  # fmt: skip

LOSS_WINDOW = 5  # the logged losses averaged to judge a run (the study's choice)
SEARCH_FOLDER = "lr_search"  # each run's metrics.jsonl: <output>/lr_search/lr-<rate>[/seed-<s>]/


@dataclass
class RateSearch:
    """What :func:`search_rates` tried and kept.

    Attributes:
        rates: the candidate rates, in the order tried (each for A and B).
        seeds: the training seeds each rate ran with (the first is the kept run's).
        run_losses: per rate, each seed's mean of its last :data:`LOSS_WINDOW` logged losses.
        chosen: the rate kept (lowest mean final loss over the seeds; ties: the smaller rate).
        result: the kept run's :class:`~stiefel_peft.cli.trainer.FitResult` (the chosen rate
            on the first seed).
    """

    rates: list[float]
    seeds: list[int]
    run_losses: list[list[float]]
    chosen: float
    result: FitResult

    @property
    def final_losses(self) -> list[float]:
        """Each rate's mean final loss over :attr:`seeds` (:func:`mean_loss`)."""
        return [mean_loss(losses) for losses in self.run_losses]

    @property
    def edge(self) -> str | None:
        """``"lowest"`` or ``"highest"`` when ``chosen`` is an end of the grid, else None
        (:func:`grid_edge`)."""
        return grid_edge(self.rates, self.chosen)

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of the report (``fora_report.json``, ``extra["lr_search"]``); a
        non-finite loss is written as None."""

        def finite(loss: float) -> float | None:
            return loss if math.isfinite(loss) else None

        return {
            "rates": self.rates,
            "seeds": self.seeds,
            "final_losses": [finite(loss) for loss in self.final_losses],
            "run_losses": [[finite(loss) for loss in losses] for losses in self.run_losses],
            "chosen": self.chosen,
            "edge": self.edge,
            "loss_window": LOSS_WINDOW,
        }


def final_loss(losses: Sequence[float], window: int = LOSS_WINDOW) -> float:
    """The mean of the last ``window`` losses (of all when fewer); ``inf`` when one of them
    is not finite, so that a diverged run is never chosen.

    Raises:
        ValueError: ``losses`` is empty or ``window`` is below 1.
    """
    if window < 1:
        raise ValueError(f"`window` must be >= 1, got {window}")
    if not losses:
        raise ValueError("a run logged no loss: train for at least one step per log")
    return _mean_or_inf(losses[-window:])


def mean_loss(losses: Sequence[float]) -> float:
    """The mean of one rate's final losses over its seeds; ``inf`` when one is not finite, so
    that a rate that diverged on any seed is never chosen.

    Raises:
        ValueError: ``losses`` is empty.
    """
    if not losses:
        raise ValueError("a rate has no final loss: run it on at least one seed")
    return _mean_or_inf(losses)


def _mean_or_inf(values: Sequence[float]) -> float:
    """The mean of non-empty ``values``, or ``inf`` when one of them is not finite: how a run
    (its last losses) and a rate (its runs' final losses) are both scored."""
    numbers = [float(value) for value in values]
    return sum(numbers) / len(numbers) if all(map(math.isfinite, numbers)) else math.inf


def grid_edge(rates: Sequence[float], chosen: float) -> str | None:
    """``"lowest"`` or ``"highest"`` when ``chosen`` is the smallest or largest of ``rates``,
    else None: a pick at an end of the grid may have a better rate beyond it.

    Raises:
        ValueError: ``chosen`` is not one of ``rates``.
    """
    if chosen not in rates:
        raise ValueError(f"`chosen` ({chosen:g}) must be one of `rates` ({list(rates)})")
    if chosen == min(rates):
        return "lowest"
    if chosen == max(rates):
        return "highest"
    return None


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def _restore(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in values:
                parameter.copy_(values[name])


def search_rates(
    model: nn.Module,
    rates: Sequence[float],
    examples: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    plan: TrainingPlan,
    output: Path,
    *,
    seeds: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = False,
    say: Callable[[str], None] = print,
) -> RateSearch:
    """Train ``model``'s FoRA adapter once per rate and seed, and leave it trained at the
    chosen rate.

    Each run starts from the adapter's current weights, calls
    ``fit(model, fora_optimizer(model, lr=rate, stiefel_lr=rate), ...)`` on ``plan`` with the
    training seed ``plan.seed + k`` (``k < seeds``) and without checkpoints or evaluations, and
    writes its ``metrics.jsonl`` under ``output / SEARCH_FOLDER / f"lr-{rate:g}"`` (one seed),
    or that folder's ``seed-<s>/`` (several). The rate with the lowest mean final loss over the
    seeds is kept, with its run on ``plan.seed``; the adapter's saved settings
    (``fora_config.json``) get it. Cost: ``len(rates) * seeds`` runs. Memory: three copies of
    the trainable weights at most (the start, the best rate's run on ``plan.seed``, the current
    rate's).

    Args:
        model: a FoRA peft model (``apply_fora``), not yet trained.
        rates: at least two distinct positive rates.
        examples, collate: the training examples and their collator (as for ``fit``).
        plan: the training plan of every run; its seed is the first training seed.
        output: the run's folder.
        seeds: the training seeds per rate (data order and dropout), at least 1.
        device: where the model is.
        progress: show each run's progress bar.
        say: where one line per run is written.

    Raises:
        ValueError: fewer than two distinct rates, a rate that is not a positive number, or
            ``seeds`` below 1.
        RuntimeError: every rate ended with a non-finite loss on some seed.
    """
    candidates = [float(rate) for rate in rates]
    if len(candidates) < 2 or len(set(candidates)) != len(candidates):
        raise ValueError(f"`rates` must hold at least two distinct rates, got {list(rates)}")
    if not all(math.isfinite(rate) and rate > 0 for rate in candidates):
        raise ValueError(f"every rate must be a positive finite number, got {list(rates)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"`seeds` must be an integer >= 1, got {seeds!r}")
    training_seeds = [plan.seed + k for k in range(seeds)]
    start = _trainable(model)
    run_losses: list[list[float]] = []
    best: tuple[float, float, dict[str, torch.Tensor], FitResult] | None = None
    for rate in candidates:
        folder = output / SEARCH_FOLDER / f"lr-{rate:g}"
        losses: list[float] = []
        for seed in training_seeds:
            _restore(model, start)
            run_plan = replace(plan, seed=seed, save_every=None, eval_every=None)
            result = fit(
                model, fora_optimizer(model, lr=rate, stiefel_lr=rate), examples, collate,
                run_plan, folder if seeds == 1 else folder / f"seed-{seed}", device=device,
                progress=progress,
            )  # fmt: skip
            losses.append(final_loss(result.losses))
            label = f"lr {rate:g}" if seeds == 1 else f"lr {rate:g}, seed {seed}"
            say(f"{label}: final training loss {losses[-1]:.4f} (mean of the last {LOSS_WINDOW})")
            if seed == plan.seed:
                kept = (_trainable(model), result)
        run_losses.append(losses)
        loss = mean_loss(losses)
        if seeds > 1:
            say(f"lr {rate:g}: mean final training loss {loss:.4f} over {seeds} seeds")
        if best is None or (loss, rate) < (best[0], best[1]):
            best = (loss, rate, *kept)
    if best is None or not math.isfinite(best[0]):
        raise RuntimeError(
            f"every rate of the search ({', '.join(f'{r:g}' for r in candidates)}) ended with a "
            "non-finite training loss; try smaller rates"
        )
    _, chosen, weights, result = best
    _restore(model, weights)
    adapter = active_adapter(model)
    config = model.fora_configs[adapter].with_overrides(lr=chosen, stiefel_lr=chosen)
    attach_settings(model, adapter, config, model.fora_reports.get(adapter))
    over = "" if seeds == 1 else f" over {seeds} seeds, kept on seed {plan.seed}"
    say(f"lr search: keeping {chosen:g} (lowest final training loss{over})")
    search = RateSearch(candidates, training_seeds, run_losses, chosen, result)
    if search.edge is not None:
        beyond, factor = ("below", 0.5) if search.edge == "lowest" else ("above", 2.0)
        say(
            f"lr search: {chosen:g} is the {search.edge} rate tried, so a better one may lie "
            f"{beyond} it: search again with {chosen * factor:g} added"
        )
    return search
