# ruff: noqa: E501  (markdown table rows read better unwrapped)
"""Does a difference between two methods change with the training length? (docs/results.md, item 5)

    python -m experiments.lengths --short experiments/results/round2_arithmetic \
        --long experiments/results/round2_arithmetic_long experiments/results/round2_arithmetic_long_more

The two schedules' runs of one seed share the data order, the held-out items and the rates,
so per (model, task) and per seed present in both, the reading is paired:

- each schedule's difference ``first - second`` of the held-out metric (FoRA - LoRA r=32 on
  all blocks by default);
- its change, ``(first - second)_long - (first - second)_short``: above 0, the first method's
  edge grows with training;
- each method's own gain from the longer schedule, and the change of its update's effective
  rank (the paper's mechanism: LoRA's rank collapsing late in training).

Each is a mean over seeds with its 95 % t-interval and the seeds for and against
(:func:`experiments.aggregate.differences_summary`). Points for a fraction, perplexity as is.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

from experiments.aggregate import differences_summary, read_results
from experiments.rate_check import metric_scale

__all__ = ["length_changes", "markdown"]

FIRST, SECOND = "fora", "lora_r32_all"


def _by_cell(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[int, Any]]]:
    """(model, task) -> label -> seed -> result."""
    cells: dict[tuple[str, str], dict[str, dict[int, Any]]] = defaultdict(lambda: defaultdict(dict))
    for result in results:
        cells[(result["model"], result["task"])][result["label"]][result["seed"]] = result
    return cells


def length_changes(
    short: list[dict[str, Any]],
    long: list[dict[str, Any]],
    first: str = FIRST,
    second: str = SECOND,
) -> list[dict[str, Any]]:
    """Per (model, task) with both methods in both schedules on at least one common seed:
    ``model``, ``task``, ``metric``, ``higher_is_better``, ``seeds`` (the common ones),
    ``steps`` (short, long) and the paired summaries (``mean``, ``std``, ``interval_95``,
    ``for``, ``against``) under ``"short"`` and ``"long"`` (``first - second``),
    ``"change"`` (long minus short), ``"gain"`` (label -> the method's long minus short) and
    ``"rank_change"`` (label -> the same for the effective rank; more is in its favour).

    Raises:
        ValueError: a schedule's runs of one cell do not share one step count, or the short
            schedule's is not below the long one's.
    """
    entries = []
    short_cells, long_cells = _by_cell(short), _by_cell(long)
    for key in sorted(set(short_cells) & set(long_cells)):
        runs = {"short": short_cells[key], "long": long_cells[key]}
        if not all(label in runs[name] for name in runs for label in (first, second)):
            continue
        seeds = sorted(
            set.intersection(
                *(set(runs[name][label]) for name in runs for label in (first, second))
            )
        )
        if not seeds:
            continue
        steps = {}
        for name in runs:
            counts = {
                runs[name][label][seed]["steps"] for label in (first, second) for seed in seeds
            }
            if len(counts) != 1:
                raise ValueError(f"{key}: the {name} runs mix step counts {sorted(counts)}")
            steps[name] = counts.pop()
        if not steps["short"] < steps["long"]:
            raise ValueError(
                f"{key}: the short schedule ({steps['short']} steps) is not below the long one ({steps['long']})"
            )
        sample = runs["short"][first][seeds[0]]
        higher = sample.get("higher_is_better", True)

        def value(
            name: str, label: str, seed: int, column: str = "after", runs: dict = runs
        ) -> float:
            return float(runs[name][label][seed][column])

        gap = {
            name: [value(name, first, seed) - value(name, second, seed) for seed in seeds]
            for name in runs
        }
        entry: dict[str, Any] = {
            "model": key[0],
            "task": key[1],
            "metric": sample["metric"],
            "higher_is_better": higher,
            "seeds": seeds,
            "steps": (steps["short"], steps["long"]),
            "short": differences_summary(gap["short"], higher),
            "long": differences_summary(gap["long"], higher),
            "change": differences_summary(
                [after - before for before, after in zip(gap["short"], gap["long"], strict=True)],
                higher,
            ),
        }
        for column, name in (("after", "gain"), ("effective_rank_mean", "rank_change")):
            entry[name] = {
                label: differences_summary(
                    [
                        value("long", label, seed, column) - value("short", label, seed, column)
                        for seed in seeds
                    ],
                    higher if column == "after" else True,
                )
                for label in (first, second)
            }
        entries.append(entry)
    return entries


def markdown(entries: list[dict[str, Any]], first: str = FIRST, second: str = SECOND) -> str:
    """One table per cell: a row per reading, its mean, 95 % interval and the seeds for,
    against and tied."""
    if not entries:
        return "_No cell has both methods in both schedules on a common seed._"
    blocks = []
    for entry in entries:
        scale, digits = metric_scale(entry)
        short, long = entry["steps"]

        def row(
            name: str,
            summary: dict[str, Any],
            unit: float = scale,
            places: int = digits,
            count: int = len(entry["seeds"]),
        ) -> str:
            low, high = (unit * bound for bound in summary["interval_95"])
            tied = count - summary["for"] - summary["against"]
            return (
                f"| {name} | {unit * summary['mean']:+.{places}f} | [{low:+.{places}f}, {high:+.{places}f}] | "
                f"{summary['for']} / {summary['against']} / {tied} |"
            )

        lines = [
            f"{entry['model']} / {entry['task']} ({len(entry['seeds'])} seeds {entry['seeds']}, {short} and {long} steps)",
            "",
            "| reading | mean | 95 % interval | seeds for / against / tied |",
            "|---|---:|---:|---:|",
            row(f"{first} - {second}, {short} steps", entry["short"]),
            row(f"{first} - {second}, {long} steps", entry["long"]),
            row(f"change ({long} - {short} steps)", entry["change"]),
            *(
                row(f"{label}: gain from {long} steps", entry["gain"][label])
                for label in (first, second)
            ),
            *(
                row(
                    f"{label}: effective rank, {long} - {short} steps",
                    entry["rank_change"][label],
                    1.0,
                    2,
                )
                for label in (first, second)
            ),
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--short", type=Path, nargs="+", required=True, help="the short schedule's result folders"
    )
    parser.add_argument(
        "--long", type=Path, nargs="+", required=True, help="the long schedule's result folders"
    )
    parser.add_argument(
        "--first", default=FIRST, help=f"the first method's label (default {FIRST})"
    )
    parser.add_argument(
        "--second", default=SECOND, help=f"the second method's label (default {SECOND})"
    )
    arguments = parser.parse_args(argv)
    entries = length_changes(
        read_results(arguments.short),
        read_results(arguments.long),
        arguments.first,
        arguments.second,
    )
    text = markdown(entries, arguments.first, arguments.second)
    print(text)
    return text


if __name__ == "__main__":
    main()
