# ruff: noqa: E501  (markdown table rows read better unwrapped)
"""How close the truly best configuration would read to the best reading (docs/results.md, item 3).

    python -m experiments.noise_ceiling experiments/results/round2_leg_counting_sweep \
        experiments/results/round2_leg_counting_seeds [more result folders] --seeds 0 1 2

Target 2 of the quality study asks for a default within ``margin`` points (2) of each cell's
best configuration, read as the mean over a few seeds. The best reading is the largest of K
noisy means, so even a rule that always named each cell's truly best configuration (an
*oracle*) would read short of it by chance. This module measures how often.

Model, per (model, task, split) cell of :func:`experiments.rate_check.cell_checks`: the
reading of configuration k on seed s is ``x[k, s] = mu[k] + beta[s] + e[k, s]`` with the
seed's effect ``beta`` shared by every configuration (one data order) and ``e`` independent
``N(0, sigma^2)``. ``sigma`` is the pooled residual of the additive fit,
``sqrt(sum(r^2) / ((K - 1)(S - 1)))`` with ``r = x - row mean - column mean + grand mean``.
Configurations whose readings are equal on every seed (the same answers) count once. The
true means are taken as the observed ones: the observed means spread more than the true ones
(by ``sigma^2 / S`` in variance), so the oracle looks more clearly best than it is, and the
chances given here are, if anything, too kind to it. Each draw gives every configuration a
new S-seed mean ``mu[k] + N(0, sigma^2 / S)`` (the seed effects cancel in a shortfall) and
takes the oracle's shortfall, ``max_k mean[k] - mean[oracle]``, with ``oracle = argmax mu``.

Two estimates of ``sigma`` are given: over every configuration, and over the upper half (the
``max(2, ceil(K / 2))`` best means), which decide the maximum; a rate that collapses on one
seed inflates the first. Per cell: ``sigma``, the chance that the oracle reads within
``margin`` and its 95th-percentile shortfall; and, for the configuration named by ``default``
when it ran on every seed, its observed shortfall and ``p``: the chance that a default exactly
``margin`` short of the best of the other configurations reads at least as far short (a small
``p``: the default misses by more than the margin, beyond what the noise explains; 1 when it
read within the margin). Across cells: the chance that the oracle is within ``margin`` on all
of them (cells independent) and the expected number of cells it misses. ``--oracle-seeds N``
asks the same of means over N seeds (``sigma`` still from the cell's own), to size a reading
that an oracle would pass. Units: points for a fraction (x 100), perplexity as is (lower is
better, so its sign is turned).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.aggregate import read_results
from experiments.rate_check import MARGIN, add_reading_arguments, cell_checks, metric_scale

__all__ = ["cell_ceilings", "markdown", "residual_spread", "shortfalls", "summary"]

DEFAULT_LABEL = "fora-rlr0.0085-slr0.001"  # the library's default: A 8.5e-3 x RMS(W), B 1e-3
DRAWS = 20_000


def residual_spread(readings: np.ndarray) -> float:
    """The pooled residual standard deviation of an additive (configuration + seed) fit.

    Args:
        readings: float array of shape ``(K, S)``, configuration by seed, ``K, S >= 2``.

    Returns:
        ``sqrt(sum(r^2) / ((K - 1)(S - 1)))``, ``r = x - row mean - column mean + grand
        mean``. O(KS).

    Raises:
        ValueError: ``readings`` is not 2-D with at least 2 rows and 2 columns, or is not
            finite.
    """
    if readings.ndim != 2 or min(readings.shape) < 2:
        raise ValueError(
            f"`readings` must be (configurations, seeds) with at least 2 of each, got shape "
            f"{tuple(readings.shape)}"
        )
    if not np.isfinite(readings).all():
        raise ValueError("`readings` must be finite: drop the runs that diverged first")
    residuals = (
        readings
        - readings.mean(axis=1, keepdims=True)
        - readings.mean(axis=0, keepdims=True)
        + readings.mean()
    )
    configurations, seeds = readings.shape
    return math.sqrt(float((residuals**2).sum()) / ((configurations - 1) * (seeds - 1)))


def shortfalls(
    means: np.ndarray,
    index: int,
    spread: float,
    seeds: int,
    draws: int,
    generator: np.random.Generator,
) -> np.ndarray:
    """Simulated shortfalls of configuration ``index``'s S-seed mean from the best one.

    Args:
        means: shape ``(K,)``, the true means (higher is better).
        index: the configuration whose shortfall is drawn, ``0 <= index < K``
            (``argmax(means)`` for the oracle).
        spread: ``sigma``, one reading's residual standard deviation, ``>= 0``.
        seeds: S, the seeds each mean is taken over, ``>= 1``.
        draws: the number of simulated readings, ``>= 1``.
        generator: the source of the normal draws.

    Returns:
        shape ``(draws,)``, each ``max_k m[k] - m[index]`` with ``m[k] = means[k] +
        N(0, spread^2 / seeds)`` independent; ``>= 0``. O(draws K) time and memory.

    Raises:
        ValueError: ``means`` is empty or not 1-D, ``index`` is out of range,
            ``spread < 0``, ``seeds < 1`` or ``draws < 1``.
    """
    if means.ndim != 1 or means.size == 0:
        raise ValueError(f"`means` must be a non-empty 1-D array, got shape {tuple(means.shape)}")
    if not 0 <= index < means.size:
        raise ValueError(f"`index` must lie in [0, {means.size}), got {index}")
    if not spread >= 0:
        raise ValueError(f"`spread` must be >= 0, got {spread}")
    if seeds < 1 or draws < 1:
        raise ValueError(f"`seeds` and `draws` must be >= 1, got {seeds} and {draws}")
    readings = means + generator.normal(0.0, spread / math.sqrt(seeds), (draws, means.size))
    return readings.max(axis=1) - readings[:, index]


def _distinct(
    per_seed: dict[str, dict[int, float]], seeds: Sequence[int]
) -> tuple[list[str], np.ndarray]:
    """The configurations' names and readings ``(K, S)``, one row per distinct reading vector
    (the first name kept, in order)."""
    names, rows, seen = [], [], set()
    for name, values in per_seed.items():
        row = tuple(values[seed] for seed in seeds)
        if row not in seen:
            seen.add(row)
            names.append(name)
            rows.append(row)
    return names, np.array(rows, dtype=float)


def _default_row(
    per_seed: dict[str, dict[int, float]], seeds: Sequence[int], names: list[str], default: str
) -> int | None:
    """The row of the distinct configurations that reads as ``default`` does (it may have been
    counted under another name), or None when ``default`` did not run on every seed."""
    if default not in per_seed:
        return None
    return next(
        row
        for row, name in enumerate(names)
        if all(per_seed[name][seed] == per_seed[default][seed] for seed in seeds)
    )


def _read_cell(
    readings: np.ndarray,
    default_row: int | None,
    observed: float | None,
    margin: float,
    draws: int,
    generator: np.random.Generator,
    oracle_seeds: int | None,
) -> dict[str, dict[str, float]]:
    """Both estimates (``"all"``, ``"upper"``) of one readable cell: ``sigma``, the oracle's
    ``within`` and ``q95`` (its means over ``oracle_seeds``, or over the cell's seeds when
    None), and ``default_p`` when ``default_row`` is given (over the cell's seeds), from the
    default's ``observed`` shortfall."""
    means = readings.mean(axis=1)
    count, seeds = readings.shape
    upper = np.sort(np.argsort(-means, kind="stable")[: max(2, math.ceil(count / 2))])
    at_margin = means.copy()
    if default_row is not None:  # the default exactly `margin` short of the best of the others
        at_margin[default_row] = np.delete(means, default_row).max() - margin
    reading = {}
    for key, rows in (("all", readings), ("upper", readings[upper])):
        spread = residual_spread(rows)
        oracle = shortfalls(
            means, int(np.argmax(means)), spread, oracle_seeds or seeds, draws, generator
        )
        reading[key] = {
            "sigma": spread,
            "within": float((oracle <= margin).mean()),
            "q95": float(np.quantile(oracle, 0.95)),
        }
        if default_row is not None and observed is not None:
            drawn = shortfalls(at_margin, default_row, spread, seeds, draws, generator)
            reading[key]["default_p"] = (
                1.0 if observed <= margin else float((drawn >= observed - 1e-9).mean())
            )
    return reading


def cell_ceilings(
    entries: list[dict[str, Any]],
    margin: float = MARGIN,
    draws: int = DRAWS,
    seed: int = 0,
    default: str = DEFAULT_LABEL,
    oracle_seeds: int | None = None,
) -> list[dict[str, Any]]:
    """The oracle's chances, and the default's test, per cell of
    :func:`experiments.rate_check.cell_checks` (entries with ``per_seed``).

    Each entry holds ``model``, ``task``, ``split``, ``metric``, ``seeds``,
    ``configurations`` (the names of the distinct ones on the full seed set), ``best`` (the
    best reading's name), ``default_shortfall`` (the default's observed shortfall, or None
    when it did not run on every seed), ``readable`` (at least 2 seeds and 2 distinct
    configurations) and ``oracle_seeds`` (the seeds of the oracle's simulated means). A readable
    entry also holds, under ``"all"`` and ``"upper"`` (the two estimates of ``sigma``): ``sigma``, ``within`` (the chance that the oracle reads within
    ``margin`` of the best), ``q95`` (its 95th-percentile shortfall) and, with a default,
    ``default_p``: the chance that a default exactly ``margin`` short of the best of the
    others reads at least as far short as the default did (1 when it read within
    ``margin``; small: it misses by more than the margin). Shortfalls and ``sigma`` are in
    the module's units. ``oracle_seeds``, when given, is the number of seeds the oracle's
    simulated means are taken over (how many seeds a reading of the target would need),
    ``sigma`` still estimated from the cell's own; ``default_p`` always reads the cell's
    seeds. Draws come from ``numpy.random.default_rng(seed)``, the cells in order.

    Raises:
        ValueError: ``margin <= 0``, ``draws < 1`` or ``oracle_seeds < 1``; a reading is
            not finite.
    """
    if not margin > 0:
        raise ValueError(f"`margin` must be > 0 (points), got {margin}")
    if draws < 1:
        raise ValueError(f"`draws` must be >= 1, got {draws}")
    if oracle_seeds is not None and oracle_seeds < 1:
        raise ValueError(f"`oracle_seeds` must be >= 1 or None, got {oracle_seeds}")
    generator = np.random.default_rng(seed)
    ceilings = []
    for entry in entries:
        sign = 1.0 if entry["higher_is_better"] else -1.0
        unit, _ = metric_scale(entry)
        per_seed = entry.get("per_seed", {})
        names, readings = _distinct(per_seed, entry["seeds"])
        shortfall = entry["shortfall_any"].get(default)
        ceiling: dict[str, Any] = {
            key: entry[key] for key in ("model", "task", "split", "metric", "seeds")
        } | {
            "configurations": names,
            "best": entry["best_any"],
            "default_shortfall": None if shortfall is None else unit * shortfall,
            "readable": len(names) >= 2 and len(entry["seeds"]) >= 2,
            "oracle_seeds": oracle_seeds or len(entry["seeds"]),
        }
        if ceiling["readable"]:
            row = _default_row(per_seed, entry["seeds"], names, default)
            ceiling |= _read_cell(
                sign * unit * readings,
                row,
                ceiling["default_shortfall"],
                margin,
                draws,
                generator,
                oracle_seeds,
            )
        ceilings.append(ceiling)
    return ceilings


def summary(ceilings: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Over the readable cells, per estimate (``"all"``, ``"upper"``): ``all_within``, the
    product of the cells' ``within`` (the oracle within the margin on every cell, cells
    independent), and ``expected_misses``, the sum of ``1 - within``."""
    readable = [ceiling for ceiling in ceilings if ceiling["readable"]]
    return {
        key: {
            "all_within": math.prod(ceiling[key]["within"] for ceiling in readable),
            "expected_misses": sum(1.0 - ceiling[key]["within"] for ceiling in readable),
        }
        for key in ("all", "upper")
    }


def markdown(ceilings: list[dict[str, Any]], margin: float = MARGIN) -> str:
    """One row per cell (sigma, the oracle's chance within ``margin`` and its 95th-percentile
    shortfall, the default's shortfall and ``default_p``), each under both estimates as
    ``all / upper half``, then the cells together."""
    if not ceilings:
        return "_No cells._"
    lines = [
        f"| cell | seeds | configurations | sigma | oracle within {margin:g} | oracle's 95th percentile | default's shortfall | p, default {margin:g} short |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ceiling in ceilings:
        cell = f"{ceiling['model']} / {ceiling['task']}"
        seeds, count = len(ceiling["seeds"]), len(ceiling["configurations"])
        if not ceiling["readable"]:
            lines.append(
                f"| {cell} | {seeds} | {count} | not readable (fewer than 2 seeds or configurations) | | | | |"
            )
            continue

        def both(key: str, form: str, ceiling: dict[str, Any] = ceiling) -> str:
            return " / ".join(format(ceiling[part][key], form) for part in ("all", "upper"))

        shortfall = ceiling["default_shortfall"]
        lines.append(
            f"| {cell} | {seeds} | {count} | {both('sigma', '.2f')} | {both('within', '.2f')} | "
            f"{both('q95', '.2f')} | "
            + (
                "not run | |"
                if shortfall is None
                else f"{shortfall:.2f} | {both('default_p', '.3f')} |"
            )
        )
    together = summary(ceilings)
    oracle_seeds = sorted({ceiling["oracle_seeds"] for ceiling in ceilings if ceiling["readable"]})
    lines += [
        "",
        f"Oracle (means over {', '.join(map(str, oracle_seeds))} seeds) within {margin:g} on "
        "every readable cell: "
        f"{together['all']['all_within']:.3f} / {together['upper']['all_within']:.3f} "
        f"(all / upper half); expected cells missed: {together['all']['expected_misses']:.2f} / "
        f"{together['upper']['expected_misses']:.2f}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_reading_arguments(parser)
    parser.add_argument("--margin", type=float, default=MARGIN, help="points (default 2)")
    parser.add_argument("--draws", type=int, default=DRAWS, help="simulated readings per cell")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    parser.add_argument(
        "--default", default=DEFAULT_LABEL, help=f"the default's label (default {DEFAULT_LABEL})"
    )
    parser.add_argument(
        "--oracle-seeds",
        type=int,
        help="take the oracle's simulated means over this many seeds (default: the cell's)",
    )
    arguments = parser.parse_args(argv)
    entries = cell_checks(read_results(arguments.folders), arguments.seeds)
    ceilings = cell_ceilings(
        entries,
        arguments.margin,
        arguments.draws,
        arguments.seed,
        arguments.default,
        arguments.oracle_seeds,
    )
    text = markdown(ceilings, arguments.margin)
    print(text)
    return text


if __name__ == "__main__":
    main()
