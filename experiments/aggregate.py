# ruff: noqa: E501  (markdown table rows and the argparse epilog read better unwrapped)
"""Aggregate quality results: mean and std over seeds per (model, task, method label).

    python -m experiments.aggregate experiments/results/smollm2_rotten_tomatoes \
        [more result folders] [--docs docs/results.md | --no-write]

Prints a markdown table and, unless ``--no-write``, puts it into ``docs/results.md`` between
the markers ``<!-- quality-results:begin -->`` and ``<!-- quality-results:end -->`` (the rest
of the file is kept).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- quality-results:begin -->", "<!-- quality-results:end -->"
COLUMNS = ("before", "after", "delta", "effective_rank_mean", "delta_w_fro_total")


# Table order: the paper's methods, then the control and the variants; other labels after.
METHOD_ORDER = (
    "lora_r32_all",
    "lora_r16_all",
    "lora_r32_fisher_top",
    "lora_r32_random_half",
    "lora_r32_bottom_half",
    "stiefel_b_all",
    "fora",
    "dora_r32_all",
    "lora_r32_all_orthoinit",
    "fora_grad_init",
    "fora_sampled",
    "fora_module",
    "fora_fisher_rank",
    "fora_random_half",
)


def _order(key: tuple[str, str, str]) -> tuple[str, str, int, str]:
    model, task, label = key
    method = label.split("-lr")[0]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (model, task, rank, label)


def read_results(folders: list[Path]) -> list[dict[str, Any]]:
    """Every result JSON directly in ``folders`` (the ``_cache`` folder is not read); an entry
    that is a JSON file is read itself (to pair one config's runs with another's)."""
    paths = [
        path
        for entry in map(Path, folders)
        for path in ([entry] if entry.is_file() else sorted(entry.glob("*.json")))
    ]
    records: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], Path] = {}
    for path in paths:
        record = json.loads(path.read_text())
        key = tuple(record.get(k) for k in ("model", "task", "label", "seed"))
        if key in seen:  # two configs' runs of one label would be averaged as one method
            raise ValueError(f"{path} and {seen[key]} are both {key}: aggregate them apart")
        seen[key] = path
        records.append(record)
    return records


# two-sided 95 % quantiles of Student's t by degrees of freedom (1..30); 1.96 beyond
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def interval_95(values: list[float]) -> tuple[float, float]:
    """The 95 % t-interval of the mean of ``values`` (paired differences over seeds)."""
    mean, std = _mean_std(values)
    if len(values) < 2:
        return mean, mean
    quantile = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    half = quantile * std / len(values) ** 0.5
    return mean - half, mean + half


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def differences_summary(differences: list[float], higher_is_better: bool) -> dict[str, Any]:
    """Per-seed paired differences ``first - second``: their mean, std and 95 % t-interval, and
    the seeds in favour of ``first`` (``"for"``: a positive difference, or a negative one when
    lower is better, as for perplexity) and against it (``"against"``); the rest are tied.

    Raises:
        statistics.StatisticsError: ``differences`` is empty.
    """
    mean, std = _mean_std(differences)
    sign = 1.0 if higher_is_better else -1.0
    return {
        "mean": mean,
        "std": std,
        "interval_95": list(interval_95(differences)),
        "for": sum(sign * difference > 0 for difference in differences),
        "against": sum(sign * difference < 0 for difference in differences),
    }


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, task, label): seeds, lr, parameters and mean/std of the metrics."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        groups[(result["model"], result["task"], result["label"])].append(result)
    rows = []
    for (model, task, label), members in sorted(groups.items(), key=lambda i: _order(i[0])):
        row: dict[str, Any] = {
            "model": model,
            "task": task,
            "method": label,
            "metric": members[0]["metric"],
            "split": members[0].get("split", "test"),
            "seeds": sorted(m["seed"] for m in members),
            "lr": members[0]["lr"],
            "stiefel_lr": members[0]["stiefel_lr"],
            "relative_lr": members[0].get("relative_lr"),
            "gradient_lr": members[0].get("gradient_lr"),
            "gradient_rate": [m.get("method_info", {}).get("gradient_rate") for m in members],
            "estimated_lr": members[0].get("estimated_lr"),
            "estimated_rate": [
                (m.get("method_info", {}).get("estimated_rate") or [None])[-1] for m in members
            ],  # the final estimate of each seed
            "trainable_parameters": members[0]["trainable_parameters"],
            "steps": members[0]["steps"],
            "train_seconds": statistics.fmean(m["seconds"]["train"] for m in members),
            "total_seconds": statistics.fmean(m["seconds"]["total"] for m in members),
        }
        for column in COLUMNS:
            row[column] = _mean_std([float(m[column]) for m in members])
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table: metric as mean +- std (over seeds), in points where it is a fraction
    (accuracy, exact match), as is for perplexity."""
    if not rows:
        return "_No results yet._"
    lines = [
        "| model | task | split | method | seeds | lr (A / B) | trainable params | before | after | delta | eff. rank | ‖ΔW‖_F | train s | total s |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        points = (100.0, 1) if row["metric"] != "perplexity" else (1.0, 2)

        def cell(name: str, scale: float = 1.0, digits: int = 1, row: dict = row) -> str:
            mean, std = row[name]
            return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"

        if row["lr"] is not None:
            a_rate = f"{row['lr']:g}"
        elif row["relative_lr"] is not None:
            a_rate = f"{row['relative_lr']:g} x RMS(W)"
        elif row.get("estimated_lr") is not None:  # mean over the seeds' final estimates
            final = statistics.fmean(row["estimated_rate"])
            a_rate = f"{row['estimated_lr']:g} x d, final d = {final:.2g}"
        else:  # the gradient-scaled rate: c / sqrt(g), mean over the seeds' rates
            rates = row["gradient_rate"]
            a_rate = f"{row['gradient_lr']:g} / sqrt(g) = {statistics.fmean(rates):.2g}"
        lr = a_rate + (f" / {row['stiefel_lr']:g}" if row["stiefel_lr"] else "")
        lines.append(
            f"| {row['model']} | {row['task']} | {row['split']} | {row['method']} | {len(row['seeds'])} | {lr} | "
            f"{row['trainable_parameters']:,} | {cell('before', *points)} | {cell('after', *points)} | "
            f"{cell('delta', *points)} | {cell('effective_rank_mean')} | "
            f"{cell('delta_w_fro_total', digits=3)} | {row['train_seconds']:.0f} | "
            f"{row['total_seconds']:.0f} |"
        )
    return "\n".join(lines)


# The paper's claims as paired differences (same seed = same data order and held-out set):
# (name, minuend label, subtrahend label) or, for the 2x2 interaction, two such pairs.
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    ("FoRA vs LoRA r=32 all (claim 1, half the parameters)", "fora", "lora_r32_all"),
    ("FoRA vs DoRA r=32 all", "fora", "dora_r32_all"),
    ("Fisher top half vs half rank (claim 2)", "lora_r32_fisher_top", "lora_r16_all"),
    ("Fisher top half vs random half", "lora_r32_fisher_top", "lora_r32_random_half"),
    ("Fisher top half vs bottom half", "lora_r32_fisher_top", "lora_r32_bottom_half"),
    ("Stiefel B vs AdamW B, all blocks (claim 3)", "stiefel_b_all", "lora_r32_all"),
    ("Stiefel B vs AdamW B, Fisher half (FoRA vs Fisher only)", "fora", "lora_r32_fisher_top"),
    ("FoRA init + AdamW vs peft init, all blocks", "lora_r32_all_orthoinit", "lora_r32_all"),
    ("Stiefel B vs AdamW B, same init, all blocks", "stiefel_b_all", "lora_r32_all_orthoinit"),
    ("gradient-informed B vs random B (FoRA)", "fora_grad_init", "fora"),
    ("sampled vs empirical Fisher (FoRA)", "fora_sampled", "fora"),
    ("per-module vs per-block selection (FoRA)", "fora_module", "fora"),
    ("Fisher-proportional rank vs top half (FoRA)", "fora_fisher_rank", "fora"),
    ("Fisher top half vs random half (FoRA)", "fora", "fora_random_half"),
    ("FoRA vs LoRA r=16 all (same parameters)", "fora", "lora_r16_all"),
    ("FoRA per module vs LoRA r=32 all", "fora_module", "lora_r32_all"),
    ("FoRA Fisher rank vs LoRA r=32 all", "fora_fisher_rank", "lora_r32_all"),
)
INTERACTION = ("fora", "lora_r32_fisher_top", "stiefel_b_all", "lora_r32_all")


def paired(
    results: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Per (model, task): each comparison of :data:`COMPARISONS` (and the 2x2 interaction)
    as the mean and std over seeds of the per-seed difference of ``after``, with the seeds
    where the difference is positive. Comparisons missing a method or a seed are left out."""
    by_key: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(dict)
    lower_is_better: dict[tuple[str, str], bool] = {}
    for result in results:
        lower_is_better[(result["model"], result["task"])] = not result.get(
            "higher_is_better", True
        )
        methods = by_key[(result["model"], result["task"])]
        methods.setdefault(result["label"], {})[result["seed"]] = float(result["after"])
    rows = []
    for (model, task), methods in sorted(by_key.items()):
        candidates = [(name, (a, b), None) for name, a, b in COMPARISONS]
        fora, fisher, stiefel, lora = INTERACTION
        candidates.append(
            (
                "2x2 interaction: (FoRA - Fisher only) - (Stiefel B all - LoRA all) (claim 3, super-additive if > 0)",
                (fora, fisher),
                (stiefel, lora),
            )
        )
        for name, first, second in candidates:
            labels = [*first, *(second or ())]
            if not all(label in methods for label in labels):
                continue
            seeds = sorted(set.intersection(*(set(methods[label]) for label in labels)))
            if not seeds:
                continue
            differences = []
            for seed in seeds:
                value = methods[first[0]][seed] - methods[first[1]][seed]
                if second:
                    value -= methods[second[0]][seed] - methods[second[1]][seed]
                differences.append(value)
            lower = lower_is_better[(model, task)]
            summary = differences_summary(differences, higher_is_better=not lower)
            rows.append(
                {
                    "model": model,
                    "task": task,
                    "comparison": name,
                    "seeds": seeds,
                    "mean": summary["mean"],
                    "std": summary["std"],
                    "interval_95": summary["interval_95"],
                    "metric": "perplexity" if lower else "fraction",
                    "positive": summary["for"],  # in favour of the first method
                    "negative": summary["against"],
                }
            )
    return rows


def paired_markdown(rows: list[dict[str, Any]]) -> str:
    """The paired differences (in points for a fraction, as is for perplexity): mean ± std over
    seeds, its 95 % t-interval, and the seeds in favour of / against the first method (for
    perplexity a negative difference is in its favour; the rest tied)."""
    if not rows:
        return ""
    lines = [
        "| model | task | comparison | difference | 95 % interval | seeds for / against / tied |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in rows:
        low, high = row["interval_95"]
        scale, digits = (1.0, 3) if row.get("metric") == "perplexity" else (100.0, 1)
        tied = len(row["seeds"]) - row["positive"] - row["negative"]
        lines.append(
            f"| {row['model']} | {row['task']} | {row['comparison']} | "
            f"{scale * row['mean']:+.{digits}f} ± {scale * row['std']:.{digits}f} | "
            f"[{scale * low:+.{digits}f}, {scale * high:+.{digits}f}] | "
            f"{row['positive']} / {row['negative']} / {tied} |"
        )
    return "\n".join(lines)


def write_between_markers(path: Path, text: str) -> None:
    """Replace what lies between :data:`BEGIN` and :data:`END` in ``path`` with ``text``.

    Raises:
        ValueError: the file lacks the markers (in that order).
    """
    content = path.read_text()
    start, end = content.find(BEGIN), content.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path} needs the lines {BEGIN!r} and {END!r} (in that order)")
    path.write_text(content[: start + len(BEGIN)] + "\n" + text + "\n" + content[end:])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "folders", type=Path, nargs="+", help="result folders (results/<config>) or result files"
    )
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    arguments = parser.parse_args(argv)
    results = read_results(arguments.folders)
    table = markdown(summarise(results))
    comparisons = paired_markdown(paired(results))
    note = (
        "Metric in points (accuracy or exact match x 100; perplexity as is, lower is better), mean ± std over seeds; "
        "eff. rank of (alpha/r) B A averaged over adapted layers; ‖ΔW‖_F = sqrt(sum over layers of ‖W′ − W‖_F²)."
    )
    text = f"{note}\n\n{table}"
    if comparisons:
        text += (
            "\n\nPaired by seed (same data order and held-out set): the difference of the "
            "held-out metric, mean ± std over seeds, its 95 % t-interval (an interval that "
            "excludes 0 is the evidence for a difference), and how many seeds it is positive, "
            "negative or tied in.\n\n" + comparisons
        )
    print(text)
    if not arguments.no_write:
        write_between_markers(arguments.docs, text)
    return text


if __name__ == "__main__":
    main()
