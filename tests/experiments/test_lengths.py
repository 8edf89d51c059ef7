"""experiments.lengths: a paired difference read at two training lengths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import lengths


def run(label: str, seed: int, after: float, rank: float, steps: int, task: str = "t") -> dict:
    return {
        "model": "m",
        "task": task,
        "label": label,
        "seed": seed,
        "steps": steps,
        "metric": "accuracy",
        "higher_is_better": True,
        "after": after,
        "effective_rank_mean": rank,
    }


def schedules() -> tuple[list[dict], list[dict]]:
    """FoRA - LoRA: +0.01, +0.03, +0.02 at 48 steps; +0.04, +0.02, +0.06 at 192 (seed 3 only
    in the long schedule, a LoRA-only cell in both)."""
    short = [
        run("fora", 0, 0.31, 24.0, 48),
        run("fora", 1, 0.33, 23.0, 48),
        run("fora", 2, 0.32, 23.5, 48),
        run("lora_r32_all", 0, 0.30, 19.0, 48),
        run("lora_r32_all", 1, 0.30, 18.0, 48),
        run("lora_r32_all", 2, 0.30, 18.5, 48),
        run("lora_r32_all", 0, 0.5, 10.0, 48, task="other"),
    ]
    long = [
        run("fora", 0, 0.44, 25.0, 192),
        run("fora", 1, 0.42, 24.0, 192),
        run("fora", 2, 0.46, 24.5, 192),
        run("fora", 3, 0.90, 24.5, 192),
        run("lora_r32_all", 0, 0.40, 18.0, 192),
        run("lora_r32_all", 1, 0.40, 17.0, 192),
        run("lora_r32_all", 2, 0.40, 18.5, 192),
        run("lora_r32_all", 3, 0.10, 18.5, 192),
        run("lora_r32_all", 0, 0.6, 10.0, 192, task="other"),
    ]
    return short, long


def test_the_change_is_paired_by_seed() -> None:
    (entry,) = lengths.length_changes(*schedules())
    assert entry["seeds"] == [0, 1, 2] and entry["steps"] == (48, 192)
    assert entry["short"]["mean"] == pytest.approx(0.02)
    assert entry["long"]["mean"] == pytest.approx(0.04)
    # per seed: +0.03, -0.01, +0.04
    assert entry["change"]["mean"] == pytest.approx(0.02)
    assert (entry["change"]["for"], entry["change"]["against"]) == (2, 1)
    assert entry["gain"]["fora"]["mean"] == pytest.approx(0.12)
    assert entry["gain"]["lora_r32_all"]["mean"] == pytest.approx(0.10)
    assert entry["rank_change"]["fora"]["mean"] == pytest.approx(1.0)
    assert entry["rank_change"]["lora_r32_all"]["mean"] == pytest.approx(-2 / 3)
    assert entry["rank_change"]["lora_r32_all"]["against"] == 2


def test_other_labels_can_be_compared() -> None:
    short, long = schedules()
    (entry,) = lengths.length_changes(short, long, first="lora_r32_all", second="fora")
    assert entry["change"]["mean"] == pytest.approx(-0.02)


def test_mixed_or_reversed_step_counts_are_refused() -> None:
    short, long = schedules()
    short[0]["steps"] = 96
    with pytest.raises(ValueError, match="mix step counts"):
        lengths.length_changes(short, long)
    short, long = schedules()
    with pytest.raises(ValueError, match="not below"):
        lengths.length_changes(long, short)


def test_no_common_seed_gives_no_entry_and_says_so() -> None:
    short, long = schedules()
    long = [result for result in long if result["seed"] == 3]
    assert lengths.length_changes(short, long) == []
    assert "No cell" in lengths.markdown([])


def test_main_reads_two_sets_of_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, results in zip(("short", "long"), schedules(), strict=True):
        folder = tmp_path / name
        folder.mkdir()
        for index, result in enumerate(results):
            (folder / f"{index}.json").write_text(json.dumps(result))
    text = lengths.main(["--short", str(tmp_path / "short"), "--long", str(tmp_path / "long")])
    assert text == capsys.readouterr().out.strip()
    assert "m / t (3 seeds [0, 1, 2], 48 and 192 steps)" in text
    assert "| change (192 - 48 steps) | +2.0 | [" in text and "| 2 / 1 / 0 |" in text
    assert "| fora: effective rank, 192 - 48 steps | +1.00 |" in text
