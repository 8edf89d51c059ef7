# ruff: noqa: E501  (markdown table rows read better unwrapped)
"""The rate check by training loss, read from the study's runs (docs/results.md, item 3).

    python -m experiments.rate_check experiments/results/round2_leg_counting_sweep \
        experiments/results/round2_leg_counting_seeds [more result folders or files]

Per (model, task, split) it takes FoRA's tied runs (A's and B's rates equal, no rate rule) and
gives each rate's mean held-out metric and mean final training loss over its seeds. The final
loss is the mean of a run's last logged losses, the number ``stiefel-peft finetune
--lr-search`` compares (:func:`stiefel_peft.cli.rate_search.final_loss`). Three picks follow:

- **best**: the best mean metric among the rates run on the most seeds (the full seed set);
- **loss, one seed**: the lowest final loss on the cell's first seed alone, what one search
  sees;
- **loss, mean**: the lowest mean final loss among the rates run on the full seed set;

and each pick's shortfall from the best, on the mean over the full seed set (points for a
fraction, perplexity as is). A pick run on fewer seeds has no shortfall.

Every other FoRA configuration of the cell under the usual schedule (a rate rule such as the
library's weight-scaled default, or A's and B's rates apart) that ran on the full seed set is
listed too, and the picks are also read against the best configuration of any kind: a search
over fixed rates can be within 2 points of the best fixed rate and further from the default.
Each is given with its paired difference from that best (mean, 95 % interval, seeds for and
against). ``--seeds 0 1 2`` reads every cell on exactly those seeds: a 3-seed reading taken
again once some configurations have seeds 3 and 4.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.aggregate import differences_summary, read_results
from stiefel_peft.cli.rate_search import final_loss
from stiefel_peft.cli.training import WARMUP

__all__ = [
    "MARGIN",
    "add_reading_arguments",
    "cell_checks",
    "markdown",
    "metric_scale",
    "usual_runs",
]

MARGIN = 2.0  # target 2's margin: within 2 points (perplexity points) of a cell's best


def usual_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FoRA's runs under the usual schedule (the 10 % warm-up), whatever their rates."""
    return [
        result
        for result in results
        if result["method"] == "fora"
        and result.get("warmup", WARMUP) == WARMUP  # older runs lack the key: the usual one
    ]


def _is_tied(result: dict[str, Any]) -> bool:
    """One fixed rate for A and B: no weight-, gradient- or estimate-based rule."""
    return (
        result.get("lr") is not None
        and result.get("stiefel_lr") == result["lr"]
        and result.get("relative_lr") is None
        and result.get("gradient_lr") is None
        and result.get("estimated_lr") is None
    )


def _others(untied: list[dict[str, Any]], seeds: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """label -> seed -> metric, on ``seeds``, of one cell's untied runs, for the configurations
    run on all of them (one reading per seed: :func:`experiments.aggregate.read_results`
    refuses two)."""
    by_label: dict[str, dict[int, float]] = defaultdict(dict)
    for result in untied:
        by_label[result["label"]][result["seed"]] = float(result["after"])
    return {
        label: {seed: values[seed] for seed in seeds}
        for label, values in sorted(by_label.items())
        if set(seeds) <= set(values)
    }


def _paired(
    values: dict[int, float], best: dict[int, float], higher_is_better: bool
) -> dict[str, Any]:
    """The per-seed difference ``values - best``: its mean, 95 % interval and the seeds where
    ``values`` is ahead (``"for"``) and behind (``"against"``)
    (:func:`experiments.aggregate.differences_summary`, without its std)."""
    differences = [values[seed] - best[seed] for seed in sorted(best)]
    summary = differences_summary(differences, higher_is_better)
    return {key: summary[key] for key in ("mean", "interval_95", "for", "against")}


def _shortfall(best: float, value: float, higher_is_better: bool) -> float:
    return best - value if higher_is_better else value - best


def cell_checks(
    results: list[dict[str, Any]], seeds: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """One entry per (model, task, split) with tied runs: its rates and the three picks.

    ``seeds``, when given, are the full seed set of every cell, and runs on other seeds are
    not read (to take a 3-seed reading again once more seeds exist); otherwise a cell's full
    seed set is the largest of its tied rates'. Where no tied rate ran on the whole set,
    ``best``, ``loss_mean`` and ``shortfall`` are None, None and empty.

    Each entry holds ``rates`` (rate -> ``{"seeds", "metric", "loss", "first_loss"}``, the
    means over the rate's seeds and the final loss on the first seed, or None without it),
    ``seeds`` (the full seed set), ``best``, ``loss_one_seed`` and ``loss_mean`` (rates),
    ``shortfall`` (rate -> shortfall from the best, for the rates run on the full seed set),
    ``others`` (label -> mean metric of each untied configuration run on the full seed set),
    ``best_any`` (the best of those and the full-set rates, a label or a rate written with
    ``:g``), ``shortfall_any`` (each of them -> shortfall from ``best_any``) and
    ``paired_any`` (each configuration of ``per_seed``, ``best_any`` included -> its per-seed
    difference from ``best_any``: ``"mean"``, ``"interval_95"`` and the seeds ``"for"`` and
    ``"against"`` it), and ``per_seed`` (each
    configuration on the full seed set, a rate written with ``:g`` or a label -> seed ->
    metric); ``best_any`` is None when nothing ran on the whole set.

    Raises:
        ValueError: a run has no logged losses (from :func:`final_loss`), or ``seeds`` is
            empty.
    """
    if seeds is not None:
        if not seeds:
            raise ValueError("`seeds` must name at least one seed, or be None")
        results = [result for result in results if result["seed"] in set(seeds)]
    cells: dict[tuple[str, str, str], dict[float, list[dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    untied: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in usual_runs(results):  # one pass: the tied runs by rate, the rest apart
        key = (result["model"], result["task"], result.get("split", "test"))
        if _is_tied(result):
            cells[key][float(result["lr"])].append(result)
        else:
            untied[key].append(result)
    entries = []
    for (model, task, split), by_rate in sorted(cells.items()):
        higher_is_better = next(iter(by_rate.values()))[0]["higher_is_better"]
        full_set = (
            tuple(sorted(set(seeds)))
            if seeds is not None
            else max((tuple(sorted(r["seed"] for r in runs)) for runs in by_rate.values()), key=len)
        )
        first_seed = min(r["seed"] for runs in by_rate.values() for r in runs)
        rates: dict[float, dict[str, Any]] = {}
        for rate, runs in sorted(by_rate.items()):
            losses = {r["seed"]: final_loss(r["last_losses"]) for r in runs}
            rates[rate] = {
                "seeds": tuple(sorted(losses)),
                "metric": statistics.fmean(float(r["after"]) for r in runs),
                "loss": statistics.fmean(losses.values()),
                "first_loss": losses.get(first_seed),
            }
        full = [rate for rate, row in rates.items() if set(full_set) <= set(row["seeds"])]
        sign = 1.0 if higher_is_better else -1.0
        best = max(full, key=lambda rate: sign * rates[rate]["metric"], default=None)
        one_seed = [rate for rate in rates if rates[rate]["first_loss"] is not None]
        others = _others(untied[(model, task, split)], full_set)
        per_seed = {
            f"{rate:g}": {
                r["seed"]: float(r["after"]) for r in by_rate[rate] if r["seed"] in full_set
            }
            for rate in full
        } | others
        candidates = {name: statistics.fmean(values.values()) for name, values in per_seed.items()}
        best_any = max(candidates, key=lambda name: sign * candidates[name], default=None)
        entries.append(
            {
                "model": model,
                "task": task,
                "split": split,
                "metric": next(iter(by_rate.values()))[0]["metric"],
                "higher_is_better": higher_is_better,
                "seeds": full_set,
                "first_seed": first_seed,
                "rates": rates,
                "best": best,
                "loss_one_seed": min(one_seed, key=lambda rate: rates[rate]["first_loss"]),
                "loss_mean": min(full, key=lambda rate: rates[rate]["loss"], default=None),
                "shortfall": {
                    rate: _shortfall(rates[best]["metric"], rates[rate]["metric"], higher_is_better)
                    for rate in full
                    if best is not None
                },
                "others": {label: candidates[label] for label in others},
                "per_seed": per_seed,
                "paired_any": {
                    name: _paired(values, per_seed[best_any], higher_is_better)
                    for name, values in per_seed.items()
                },
                "best_any": best_any,
                "shortfall_any": {
                    name: _shortfall(candidates[best_any], value, higher_is_better)
                    for name, value in candidates.items()
                },
            }
        )
    return entries


def metric_scale(entry: dict[str, Any]) -> tuple[float, int]:
    """Points for a fraction (x 100, one decimal), perplexity as is (two decimals)."""
    return (1.0, 2) if entry["metric"] == "perplexity" else (100.0, 1)


def _against_any(entry: dict[str, Any]) -> list[str]:
    """The untied configurations and the picks read against the best of any kind (no lines
    when the cell has no untied configuration on the full seed set)."""
    if not entry["others"]:
        return []
    scale, digits = metric_scale(entry)
    gap = entry["shortfall_any"]

    def short(name: str) -> str:
        return "n/a (fewer seeds)" if name not in gap else f"{scale * gap[name]:.{digits}f}"

    def paired(label: str) -> str:
        row = entry["paired_any"][label]
        low, high = (scale * bound for bound in row["interval_95"])
        return (
            f"paired {scale * row['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}], "
            f"{row['for']} of {len(entry['seeds'])} seeds for it, {row['against']} against"
        )

    listed = "; ".join(
        f"{label} {scale * value:.{digits}f} (shortfall {short(label)}"
        + ("" if label == entry["best_any"] else f"; {paired(label)}")
        + ")"
        for label, value in entry["others"].items()
    )
    lines = [f"other configurations on the full seed set: {listed}"]
    if entry["loss_mean"] is None:
        return [*lines, f"best of any kind: {entry['best_any']}"]
    one_seed, mean = f"{entry['loss_one_seed']:g}", f"{entry['loss_mean']:g}"
    return [
        *lines,
        f"best of any kind: {entry['best_any']}; from it, the lowest final loss on seed "
        f"{entry['first_seed']} ({one_seed}) is {short(one_seed)} short, the lowest mean final "
        f"loss ({mean}) {short(mean)}",
    ]


def markdown(entries: list[dict[str, Any]]) -> str:
    """One table per cell (rate, seeds, metric, final loss, first seed's final loss,
    shortfall) and a line with the three picks and their shortfalls."""
    if not entries:
        return "_No tied FoRA runs._"
    blocks = []
    for entry in entries:
        scale, digits = metric_scale(entry)

        def shortfall(rate: float, entry: dict[str, Any] = entry) -> str:
            value = entry["shortfall"].get(rate)
            if value is None:
                return "n/a (fewer seeds)"
            scale, digits = metric_scale(entry)
            return f"{scale * value:.{digits}f}"

        lines = [
            f"{entry['model']} / {entry['task']} ({entry['split']}, full seed set {list(entry['seeds'])})",
            "",
            f"| rate | seeds | {entry['metric']} | final loss | final loss, seed {entry['first_seed']} | shortfall |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for rate, row in entry["rates"].items():
            first = "" if row["first_loss"] is None else f"{row['first_loss']:.3f}"
            lines.append(
                f"| {rate:g} | {len(row['seeds'])} | {scale * row['metric']:.{digits}f} | "
                f"{row['loss']:.3f} | {first} | {shortfall(rate)} |"
            )
        lines.append("")
        if entry["best"] is None:
            lines.append(f"no tied rate ran on every seed of {list(entry['seeds'])}")
        else:
            lines.append(
                f"best {entry['best']:g}; lowest final loss on seed {entry['first_seed']}: "
                f"{entry['loss_one_seed']:g} (shortfall {shortfall(entry['loss_one_seed'])}); "
                f"lowest mean final loss: {entry['loss_mean']:g} (shortfall {shortfall(entry['loss_mean'])})"
            )
        lines.extend(_against_any(entry))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def add_reading_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a reading of :func:`cell_checks`: ``folders`` and ``--seeds``."""
    parser.add_argument(
        "folders", type=Path, nargs="+", help="result folders (results/<config>) or result files"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="read every cell on exactly these seeds (default: each cell's largest seed set)",
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_reading_arguments(parser)
    arguments = parser.parse_args(argv)
    text = markdown(cell_checks(read_results(arguments.folders), arguments.seeds))
    print(text)
    return text


if __name__ == "__main__":
    main()
