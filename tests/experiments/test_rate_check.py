"""experiments.rate_check: the training-loss rate check read from result records."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from experiments import rate_check


def record(rate: float, seed: int, after: float, losses: list[float], **extra: Any) -> dict:
    return {
        "model": "m",
        "task": "t",
        "split": "validation",
        "method": "fora",
        "label": f"fora-lr{rate:g}-slr{rate:g}",
        "seed": seed,
        "lr": rate,
        "stiefel_lr": rate,
        "relative_lr": None,
        "gradient_lr": None,
        "estimated_lr": None,
        "metric": "accuracy",
        "higher_is_better": True,
        "after": after,
        "last_losses": losses,
        **extra,
    }


def cell() -> list[dict]:
    # rate -> (after, final losses) per seed 0, 1; 4e-3 has seed 0 only
    runs = {
        5e-4: [(0.70, [0.5] * 5), (0.72, [0.4] * 5)],
        1e-3: [(0.80, [0.6] * 5), (0.78, [0.6] * 5)],
        2e-3: [(0.60, [0.3] * 5), (0.50, [0.9] * 5)],
        4e-3: [(0.90, [0.1] * 5)],
    }
    results = [
        record(rate, seed, after, losses)
        for rate, seeds in runs.items()
        for seed, (after, losses) in enumerate(seeds)
    ]
    untied = record(1e-3, 0, 0.99, [0.01] * 5, stiefel_lr=2e-3, label="fora-lr0.001-slr0.002")
    ruled = record(1e-3, 1, 0.99, [0.01] * 5, relative_lr=5e-3, lr=None, label="fora-rel")
    lora = record(1e-3, 0, 0.99, [0.01] * 5, method="lora_r32_all", label="lora")
    warmed = [record(8e-3, seed, 0.99, [0.01] * 5, warmup=0.5) for seed in (0, 1)]
    results[0]["warmup"] = 0.1  # runs stored before the key have none: both are the usual one
    return [*results, untied, ruled, lora, *warmed]


def test_picks_and_shortfalls_of_a_cell() -> None:
    (entry,) = rate_check.cell_checks(cell())
    assert entry["seeds"] == (0, 1) and entry["first_seed"] == 0
    # untied, ruled, LoRA and the longer warm-up left out; the usual warm-up named is kept
    assert set(entry["rates"]) == {5e-4, 1e-3, 2e-3, 4e-3}
    assert entry["rates"][5e-4]["seeds"] == (0, 1)
    assert entry["best"] == 1e-3  # 4e-3 is better on seed 0 but has one seed
    assert entry["loss_one_seed"] == 4e-3  # lowest seed-0 loss: 0.1
    assert entry["loss_mean"] == 5e-4  # mean losses 0.45, 0.6, 0.6 on the full seed set
    assert entry["shortfall"] == pytest.approx({5e-4: 0.08, 1e-3: 0.0, 2e-3: 0.24})
    assert entry["rates"][2e-3]["loss"] == pytest.approx(0.6)
    text = rate_check.markdown([entry])
    assert "| 0.0005 | 2 | 71.0 | 0.450 | 0.500 | 8.0 |" in text
    assert "| 0.004 | 1 | 90.0 | 0.100 | 0.100 | n/a (fewer seeds) |" in text
    assert "lowest final loss on seed 0: 0.004 (shortfall n/a (fewer seeds))" in text
    assert "lowest mean final loss: 0.0005 (shortfall 8.0)" in text


def test_perplexity_is_better_lower_and_a_diverged_run_is_never_picked() -> None:
    results = [
        record(1e-3, 0, 21.0, [3.0] * 5, metric="perplexity", higher_is_better=False),
        record(2e-3, 0, 20.0, [3.1] * 5, metric="perplexity", higher_is_better=False),
        record(4e-3, 0, 90.0, [2.0, 2.0, 2.0, 2.0, math.nan], metric="perplexity",
               higher_is_better=False),
    ]  # fmt: skip
    (entry,) = rate_check.cell_checks(results)
    assert entry["best"] == 2e-3
    assert entry["loss_one_seed"] == 1e-3 and entry["loss_mean"] == 1e-3
    assert entry["shortfall"][1e-3] == pytest.approx(1.0)
    assert "| 0.001 | 1 | 21.00 | 3.000 | 3.000 | 1.00 |" in rate_check.markdown([entry])


def test_main_reads_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for index, result in enumerate(cell()[:7]):
        (tmp_path / f"{index}.json").write_text(json.dumps(result))
    text = rate_check.main([str(tmp_path)])
    assert text in capsys.readouterr().out and "best 0.001;" in text
    assert rate_check.markdown([]) == "_No tied FoRA runs._"


def test_picks_are_also_read_against_every_configuration() -> None:
    # the weight-scaled rule on both seeds beats every fixed rate; the longer warm-up is left out
    ruled = [
        record(1e-3, seed, after, [0.7] * 5, relative_lr=8.5e-3, lr=None, stiefel_lr=1e-3,
               label="fora-rlr0.0085-slr0.001")
        for seed, after in ((0, 0.84), (1, 0.82))
    ]  # fmt: skip
    smaller = [
        record(1e-3, seed, after, [0.7] * 5, relative_lr=5e-3, lr=None, stiefel_lr=1e-3,
               label="fora-rlr0.005-slr0.001")
        for seed, after in ((0, 0.80), (1, 0.83))
    ]  # fmt: skip
    (entry,) = rate_check.cell_checks([*cell(), *ruled, *smaller])
    assert entry["best"] == 1e-3  # the fixed-rate reading is unchanged
    assert entry["others"] == pytest.approx(
        {"fora-rlr0.005-slr0.001": 0.815, "fora-rlr0.0085-slr0.001": 0.83}
    )
    assert entry["best_any"] == "fora-rlr0.0085-slr0.001"
    assert entry["shortfall_any"] == pytest.approx(
        {"0.0005": 0.12, "0.001": 0.04, "0.002": 0.28, "fora-rlr0.0085-slr0.001": 0.0,
         "fora-rlr0.005-slr0.001": 0.015}
    )  # fmt: skip
    # per-seed differences -0.04 and +0.01 from the best: t(1) = 12.706, std 0.0354
    smaller_row = entry["paired_any"]["fora-rlr0.005-slr0.001"]
    assert smaller_row["mean"] == pytest.approx(-0.015)
    assert smaller_row["interval_95"] == pytest.approx([-0.3327, 0.3027], abs=1e-4)
    assert (smaller_row["for"], smaller_row["against"]) == (1, 1)
    assert entry["paired_any"]["fora-rlr0.0085-slr0.001"]["mean"] == 0.0
    text = rate_check.markdown([entry])
    assert (
        "other configurations on the full seed set: fora-rlr0.005-slr0.001 81.5 (shortfall 1.5; "
        "paired -1.5 [-33.3, +30.3], 1 of 2 seeds for it, 1 against); "
        "fora-rlr0.0085-slr0.001 83.0 (shortfall 0.0)" in text
    )
    assert (
        "best of any kind: fora-rlr0.0085-slr0.001; from it, the lowest final loss on seed 0 "
        "(0.004) is n/a (fewer seeds) short, the lowest mean final loss (0.0005) 12.0" in text
    )
    (plain,) = rate_check.cell_checks(cell())  # one seed of a rule is not enough to be listed
    assert plain["others"] == {} and "best of any kind" not in rate_check.markdown([plain])


def test_a_named_seed_set_reads_every_cell_on_those_seeds_only() -> None:
    results = [*cell(), record(5e-4, 2, 0.10, [0.2] * 5), record(1e-3, 2, 0.90, [0.2] * 5)]
    (grown,) = rate_check.cell_checks(results)  # 5e-4 and 1e-3 now have seeds 0-2
    assert grown["seeds"] == (0, 1, 2) and set(grown["shortfall"]) == {5e-4, 1e-3}
    (again,) = rate_check.cell_checks(results, seeds=[1, 0])  # the 2-seed reading, as before
    assert again["seeds"] == (0, 1) and again["best"] == 1e-3
    assert again["shortfall"] == pytest.approx({5e-4: 0.08, 1e-3: 0.0, 2e-3: 0.24})
    assert again["rates"][5e-4]["metric"] == pytest.approx(0.71)  # seed 2's 0.10 not read


def test_a_seed_set_no_tied_rate_covers_leaves_the_best_empty() -> None:
    ruled = [
        record(1e-3, seed, 0.8, [0.7] * 5, relative_lr=8.5e-3, lr=None, stiefel_lr=1e-3,
               label="fora-rlr0.0085-slr0.001")
        for seed in (0, 1, 2)
    ]  # fmt: skip
    (entry,) = rate_check.cell_checks([*cell(), *ruled], seeds=[0, 1, 2])
    assert entry["best"] is None and entry["loss_mean"] is None and entry["shortfall"] == {}
    assert entry["best_any"] == "fora-rlr0.0085-slr0.001"
    text = rate_check.markdown([entry])
    assert "no tied rate ran on every seed of [0, 1, 2]" in text
    assert "best of any kind: fora-rlr0.0085-slr0.001" in text
    with pytest.raises(ValueError, match="`seeds` must name at least one seed"):
        rate_check.cell_checks(cell(), seeds=[])


def test_main_takes_a_seed_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for index, result in enumerate(cell()[:7]):
        (tmp_path / f"{index}.json").write_text(json.dumps(result))
    text = rate_check.main([str(tmp_path), "--seeds", "0"])
    assert "full seed set [0]" in text and "best 0.004;" in text  # one seed: 4e-3 counts
