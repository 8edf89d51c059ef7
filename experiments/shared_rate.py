# ruff: noqa: E501  (markdown table rows read better unwrapped)
"""Can one configuration serve several cells? (docs/results.md, item 3: why no rule passes)

    python -m experiments.shared_rate experiments/results/round2_out_of_sample_gemma_arithmetic \
        experiments/results/round2_conflict_gemma_family_relationships [more] --seeds 0 1 2 3 4

Target 2 asks for one default within ``margin`` (2) points of the best configuration on every
task. ``fora_optimizer(model)`` sees the model, not the task, so a default that gives one
model's layers the same rates on every task can meet it only if some configuration does so on
all of that model's cells at once. This reading asks that directly.

The cells are those of :func:`experiments.rate_check.cell_checks` (one per model, task and
split, read on its full seed set or on ``--seeds``). For each configuration read on the full
seed set of every cell (a tied rate, written with ``:g``, or the label of any other FoRA
configuration, such as the library's weight-scaled default), per cell:

- its **shortfall** from the cell's best configuration of any kind (``best_any``), on the
  mean over the seeds, in the cell's units (points for a fraction, perplexity as is);
- the paired difference from that best (mean, 95 % t-interval, seeds for and against), and
  whether the whole interval lies more than ``margin`` short (**shown short**);

then its **worst** shortfall over the cells. A configuration **passes** when its worst
shortfall is at most ``margin``: target 2's point reading, restricted to these cells. Each
cell's best is the largest of its readings, which noise pushes up
(:mod:`experiments.noise_ceiling` says by how much): a miss is read against that, and "shown
short" is the stronger statement, although it too is read against the selected best.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from experiments.aggregate import read_results
from experiments.rate_check import MARGIN, add_reading_arguments, cell_checks, metric_scale

__all__ = ["markdown", "shared_readings"]


def _cell_name(entry: dict[str, Any]) -> str:
    return f"{entry['model']} / {entry['task']} ({entry['split']})"


def _units(entry: dict[str, Any]) -> str:
    """Points for a metric that :func:`metric_scale` shows x 100, else the metric's own name."""
    scale, _ = metric_scale(entry)
    return "points" if scale == 100.0 else entry["metric"]


def _reading(entry: dict[str, Any], name: str, margin: float) -> dict[str, Any]:
    """One configuration in one cell, in the cell's units: ``shortfall`` from ``best_any``,
    the paired ``difference`` (``mean``, ``interval_95``, ``for``, ``against``), whether it is
    the cell's best (``is_best``) and whether the interval lies wholly more than ``margin``
    short (``shown_short``)."""
    scale, _ = metric_scale(entry)
    raw = entry["paired_any"][name]
    low, high = (scale * bound for bound in raw["interval_95"])
    nearest = -high if entry["higher_is_better"] else low  # the end nearest to no shortfall
    is_best = name == entry["best_any"]
    return {
        "shortfall": scale * entry["shortfall_any"][name],
        "difference": raw | {"mean": scale * raw["mean"], "interval_95": [low, high]},
        "is_best": is_best,
        "shown_short": not is_best and nearest > margin,
    }


def shared_readings(entries: list[dict[str, Any]], margin: float = MARGIN) -> dict[str, Any]:
    """The reading over the cells of ``entries`` (from :func:`cell_checks`).

    Returns ``cells`` (their names, ``"model / task (split)"``), ``units`` (per cell,
    ``"points"`` or ``"perplexity"``), ``digits`` (per cell, the decimals it is shown with:
    :func:`metric_scale`), ``best`` (per cell, its best configuration), ``margin``,
    ``rows`` (one per configuration read on every cell's full seed set, smallest worst
    shortfall first: ``configuration``, ``readings`` (per cell, as in the module's text:
    ``shortfall``, ``difference``, ``is_best`` and ``shown_short``), ``worst``, ``worst_cell`` and
    ``passes``) and ``missing`` (configuration -> the cells whose full seed set it lacks, for
    a configuration read on some but not all).

    Raises:
        ValueError: fewer than two cells, a cell with nothing on its full seed set, a cell
            read on a single seed (no interval), or a ``margin`` below 0 or NaN.
    """
    if not margin >= 0:  # NaN too
        raise ValueError(f"`margin` must be a number at least 0, got {margin}")
    if len(entries) < 2:
        raise ValueError(
            f"a shared configuration needs at least two cells, got {len(entries)}: give the "
            "result folders of every cell to read together"
        )
    for entry in entries:
        if entry["best_any"] is None:
            raise ValueError(
                f"{_cell_name(entry)}: no configuration ran on its full seed set "
                f"{list(entry['seeds'])}; pass --seeds with the seeds they share"
            )
        if len(entry["seeds"]) < 2:
            raise ValueError(
                f"{_cell_name(entry)}: read on one seed, which gives no interval; pass "
                "--seeds with at least two"
            )
    names = [_cell_name(entry) for entry in entries]
    cells = list(zip(names, entries, strict=True))
    everywhere = set.intersection(*(set(entry["per_seed"]) for entry in entries))
    anywhere = set.union(*(set(entry["per_seed"]) for entry in entries))
    rows = []
    for configuration in everywhere:
        readings = {name: _reading(entry, configuration, margin) for name, entry in cells}
        worst_cell = max(names, key=lambda name: readings[name]["shortfall"])
        worst = readings[worst_cell]["shortfall"]
        rows.append(
            {
                "configuration": configuration,
                "readings": readings,
                "worst": worst,
                "worst_cell": worst_cell,
                "passes": worst <= margin,
            }
        )
    rows.sort(key=lambda row: (row["worst"], row["configuration"]))
    return {
        "cells": names,
        "units": {name: _units(entry) for name, entry in cells},
        "digits": {name: metric_scale(entry)[1] for name, entry in cells},
        "best": {name: entry["best_any"] for name, entry in cells},
        "margin": margin,
        "rows": rows,
        "missing": {
            configuration: [name for name, entry in cells if configuration not in entry["per_seed"]]
            for configuration in sorted(anywhere - everywhere)
        },
    }


def _one(reading: dict[str, Any], digits: int) -> str:
    if reading["is_best"]:
        return "0 (best)"
    difference = reading["difference"]
    low, high = difference["interval_95"]
    marker = " (shown short)" if reading["shown_short"] else ""
    return (
        f"{reading['shortfall']:.{digits}f}{marker}: {difference['mean']:+.{digits}f} "
        f"[{low:+.{digits}f}, {high:+.{digits}f}], {difference['for']}/{difference['against']}"
    )


def markdown(reading: dict[str, Any]) -> str:
    """A table (configuration, each cell's shortfall with its paired difference and the seeds
    for/against, the worst) and lines for the best of each cell, the configuration with the
    smallest worst shortfall and the configurations read on only some cells."""
    margin, cells = reading["margin"], reading["cells"]
    lines = [
        "| configuration | " + " | ".join(cells) + " | worst |",
        "|---|" + "---:|" * (len(cells) + 1),
    ]
    for row in reading["rows"]:
        worst = f"{row['worst']:.1f}" + ("" if row["passes"] else f" (over {margin:g})")
        lines.append(
            f"| {row['configuration']} | "
            + " | ".join(_one(row["readings"][name], reading["digits"][name]) for name in cells)
            + f" | {worst} |"
        )
    lines.append("")
    lines.append(
        "each cell: shortfall from its best: paired difference, mean [95 % interval], seeds "
        "for/against; units: " + "; ".join(f"{name} {reading['units'][name]}" for name in cells)
    )
    lines.append("best per cell: " + "; ".join(f"{name} {reading['best'][name]}" for name in cells))
    if reading["rows"]:
        top = reading["rows"][0]
        passing = [row["configuration"] for row in reading["rows"] if row["passes"]]
        shown = [
            row["configuration"]
            for row in reading["rows"]
            if any(item["shown_short"] for item in row["readings"].values())
        ]
        lines.append(
            f"smallest worst shortfall: {top['configuration']}, {top['worst']:.1f} "
            f"({top['worst_cell']}); within {margin:g} on every cell: "
            f"{', '.join(passing) if passing else 'none'}; shown more than {margin:g} short on "
            f"some cell: {', '.join(shown) if shown else 'none'}"
        )
    else:
        lines.append("no configuration ran on the full seed set of every cell")
    if reading["missing"]:
        lacking = [
            f"{name} (not on {', '.join(absent)})" for name, absent in reading["missing"].items()
        ]
        lines.append("read on some cells only: " + "; ".join(lacking))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_reading_arguments(parser)
    parser.add_argument(
        "--margin", type=float, default=MARGIN, help="target 2's margin, in each cell's units"
    )
    arguments = parser.parse_args(argv)
    entries = cell_checks(read_results(arguments.folders), arguments.seeds)
    text = markdown(shared_readings(entries, arguments.margin))
    print(text)
    return text


if __name__ == "__main__":
    main()
