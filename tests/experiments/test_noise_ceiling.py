"""experiments.noise_ceiling: how far the truly best configuration reads from the best reading."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from experiments import noise_ceiling, rate_check
from tests.experiments.test_rate_check import record

LOSSES = [0.5] * 5


def cell(readings: dict[str, list[float]], metric: str = "accuracy") -> list[dict]:
    """Tied rates named by their rate; ``default`` the weight-scaled rule."""
    results = []
    for name, values in readings.items():
        for seed, after in enumerate(values):
            if name == "default":
                rule = {"lr": None, "stiefel_lr": 1e-3, "relative_lr": 8.5e-3}
                label = noise_ceiling.DEFAULT_LABEL
                results.append(record(1e-3, seed, after, LOSSES, **rule, label=label))
            else:
                results.append(record(float(name), seed, after, LOSSES))
    if metric == "perplexity":
        for result in results:
            result |= {"metric": "perplexity", "higher_is_better": False}
    return results


def test_residual_spread_is_zero_for_an_additive_table_and_exact_otherwise() -> None:
    configuration, seed = np.array([[0.0], [3.0], [7.0]]), np.array([[1.0, -2.0, 5.0]])
    assert noise_ceiling.residual_spread(configuration + seed) == pytest.approx(0.0, abs=1e-12)
    # a 2 x 2 interaction of +-e: four residuals of size e over (2 - 1)(2 - 1) = 1 degree
    e = 0.7
    readings = np.array([[e, -e], [-e, e]]) + np.array([[10.0], [20.0]])
    assert noise_ceiling.residual_spread(readings) == pytest.approx(2 * e)


@pytest.mark.parametrize("bad", [np.zeros((1, 3)), np.zeros((3, 1)), np.zeros(4)])
def test_residual_spread_needs_two_configurations_and_two_seeds(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="readings"):
        noise_ceiling.residual_spread(bad)


def test_residual_spread_refuses_a_diverged_reading() -> None:
    with pytest.raises(ValueError, match="finite"):
        noise_ceiling.residual_spread(np.array([[1.0, math.nan], [2.0, 3.0]]))


def test_two_equal_configurations_match_the_normal_reference() -> None:
    """Two configurations with equal means: the oracle's shortfall is max(0, d), d ~ N(0,
    2 sigma^2 / S), so P(shortfall <= m) = Phi(m / (sigma sqrt(2 / S)))."""
    spread, seeds, margin = 3.0, 3, 2.0
    drawn = noise_ceiling.shortfalls(
        np.array([50.0, 50.0]), 0, spread, seeds, 40_000, np.random.default_rng(1)
    )
    expected = NormalDist().cdf(margin / (spread * math.sqrt(2 / seeds)))
    assert (drawn <= margin).mean() == pytest.approx(expected, abs=0.01)
    assert (drawn >= 0).all() and (drawn == 0).mean() == pytest.approx(0.5, abs=0.01)


def test_without_noise_the_shortfall_is_the_gap() -> None:
    means = np.array([10.0, 12.5, 11.0])
    for index, gap in enumerate((2.5, 0.0, 1.5)):
        drawn = noise_ceiling.shortfalls(means, index, 0.0, 3, 5, np.random.default_rng(0))
        assert drawn == pytest.approx([gap] * 5)


@pytest.mark.parametrize(
    ("means", "index", "spread", "seeds", "draws", "match"),
    [
        (np.array([]), 0, 1.0, 3, 10, "means"),
        (np.zeros((2, 2)), 0, 1.0, 3, 10, "means"),
        (np.zeros(2), 2, 1.0, 3, 10, "index"),
        (np.zeros(2), 0, -1.0, 3, 10, "spread"),
        (np.zeros(2), 0, math.nan, 3, 10, "spread"),
        (np.zeros(2), 0, 1.0, 0, 10, "seeds"),
        (np.zeros(2), 0, 1.0, 3, 0, "draws"),
    ],
)
def test_shortfalls_refuse_bad_input(
    means: np.ndarray, index: int, spread: float, seeds: int, draws: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        noise_ceiling.shortfalls(means, index, spread, seeds, draws, np.random.default_rng(0))


def test_a_clear_best_and_a_clear_miss() -> None:
    """Small noise: the oracle is always within the margin; a default 10 points short is
    far beyond a default 2 short; equal readings count once."""
    readings = {
        "0.001": [0.80, 0.81, 0.79],
        "0.002": [0.60, 0.61, 0.59],
        "0.004": [0.60, 0.61, 0.59],  # the same answers as 0.002 on every seed
        "default": [0.70, 0.71, 0.70],
    }
    (entry,) = rate_check.cell_checks(cell(readings))
    (ceiling,) = noise_ceiling.cell_ceilings([entry], draws=4000)
    assert ceiling["readable"] and ceiling["configurations"] == [
        "0.001",
        "0.002",
        noise_ceiling.DEFAULT_LABEL,
    ]
    assert ceiling["best"] == "0.001"
    assert ceiling["default_shortfall"] == pytest.approx(100 * (0.80 - 0.7033333), abs=1e-4)
    for key in ("all", "upper"):
        assert ceiling[key]["within"] == 1.0
        assert ceiling[key]["q95"] < 0.5
        assert ceiling[key]["default_p"] < 0.01
    # the upper half (two of three) leaves out 0.002's seeds
    assert ceiling["upper"]["sigma"] == pytest.approx(
        noise_ceiling.residual_spread(100 * np.array([readings["0.001"], readings["default"]]))
    )


def test_a_default_within_the_margin_has_p_one_and_noise_keeps_the_oracle_short() -> None:
    readings = {
        "0.001": [0.80, 0.70, 0.90],
        "0.002": [0.70, 0.85, 0.78],
        "default": [0.80, 0.76, 0.80],
    }
    (entry,) = rate_check.cell_checks(cell(readings))
    (ceiling,) = noise_ceiling.cell_ceilings([entry], draws=4000)
    assert ceiling["default_shortfall"] < 2
    assert ceiling["all"]["default_p"] == 1.0
    assert ceiling["all"]["sigma"] > 5 and ceiling["all"]["within"] < 0.9


def test_perplexity_is_turned_and_kept_in_its_own_units() -> None:
    readings = {"0.001": [20.0, 20.2, 19.9], "default": [23.0, 23.1, 22.8]}
    (entry,) = rate_check.cell_checks(cell(readings, "perplexity"))
    (ceiling,) = noise_ceiling.cell_ceilings([entry], draws=2000)
    assert ceiling["best"] == "0.001"
    assert ceiling["default_shortfall"] == pytest.approx(22.9667 - 20.0333, abs=1e-3)
    assert ceiling["all"]["within"] == 1.0 and ceiling["all"]["default_p"] < 0.01


def test_a_default_counted_under_another_name_is_still_found() -> None:
    readings = {"0.001": [0.5, 0.6, 0.7], "default": [0.5, 0.6, 0.7], "0.002": [0.4, 0.5, 0.5]}
    (entry,) = rate_check.cell_checks(cell(readings))
    (ceiling,) = noise_ceiling.cell_ceilings([entry], draws=1000)
    assert noise_ceiling.DEFAULT_LABEL not in ceiling["configurations"]
    assert ceiling["default_shortfall"] == 0 and ceiling["all"]["default_p"] == 1.0


def test_a_cell_without_a_default_or_with_one_seed() -> None:
    no_default = rate_check.cell_checks(cell({"0.001": [0.5, 0.6], "0.002": [0.4, 0.6]}))
    one_seed = rate_check.cell_checks(cell({"0.001": [0.5], "0.002": [0.4]}))
    (with_two,) = noise_ceiling.cell_ceilings(no_default, draws=100)
    (with_one,) = noise_ceiling.cell_ceilings(one_seed, draws=100)
    assert with_two["default_shortfall"] is None and "default_p" not in with_two["all"]
    assert not with_one["readable"] and "all" not in with_one


def test_summary_multiplies_chances_and_adds_misses() -> None:
    ceilings = [
        {"readable": True, "all": {"within": 0.5}, "upper": {"within": 1.0}},
        {"readable": True, "all": {"within": 0.8}, "upper": {"within": 0.9}},
        {"readable": False},
    ]
    together = noise_ceiling.summary(ceilings)
    assert together["all"] == pytest.approx({"all_within": 0.4, "expected_misses": 0.7})
    assert together["upper"] == pytest.approx({"all_within": 0.9, "expected_misses": 0.1})


@pytest.mark.parametrize(
    ("margin", "draws", "oracle_seeds", "match"),
    [(0.0, 10, None, "margin"), (2.0, 0, None, "draws"), (2.0, 10, 0, "oracle_seeds")],
)
def test_cell_ceilings_refuse_bad_settings(
    margin: float, draws: int, oracle_seeds: int | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        noise_ceiling.cell_ceilings([], margin=margin, draws=draws, oracle_seeds=oracle_seeds)


def test_more_oracle_seeds_narrow_its_shortfall_but_not_the_default_test() -> None:
    readings = {
        "0.001": [0.80, 0.70, 0.90],
        "0.002": [0.70, 0.85, 0.78],
        "default": [0.70, 0.72, 0.74],
    }
    entries = rate_check.cell_checks(cell(readings))
    (own,) = noise_ceiling.cell_ceilings(entries, draws=4000, seed=5)
    (many,) = noise_ceiling.cell_ceilings(entries, draws=4000, seed=5, oracle_seeds=30)
    assert (own["oracle_seeds"], many["oracle_seeds"]) == (3, 30)
    assert many["all"]["sigma"] == own["all"]["sigma"]
    assert many["all"]["within"] > own["all"]["within"] + 0.1
    assert many["all"]["default_p"] == pytest.approx(own["all"]["default_p"], abs=0.05)


def test_the_simulation_is_seeded() -> None:
    entries = rate_check.cell_checks(
        cell({"0.001": [0.5, 0.6, 0.7], "0.002": [0.55, 0.5, 0.7], "default": [0.5, 0.5, 0.6]})
    )
    first, again = (noise_ceiling.cell_ceilings(entries, draws=500, seed=3) for _ in range(2))
    other = noise_ceiling.cell_ceilings(entries, draws=500, seed=4)
    assert first == again and first != other


def test_main_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readings = {"0.001": [0.8, 0.7, 0.75], "0.002": [0.6, 0.65, 0.7], "default": [0.7, 0.7, 0.7]}
    one_seed = [record(1e-3, 0, 0.5, LOSSES, task="u")]
    for index, result in enumerate(cell(readings) + one_seed):
        (tmp_path / f"{index}.json").write_text(json.dumps(result))
    text = noise_ceiling.main([str(tmp_path), "--draws", "300", "--margin", "3"])
    assert text == capsys.readouterr().out.strip()
    assert "| m / t | 3 | 3 |" in text and "oracle within 3" in text
    assert "| m / u | 1 | 1 | not readable" in text
    assert "Oracle (means over 3 seeds) within 3 on every readable cell:" in text
    more = noise_ceiling.main([str(tmp_path), "--draws", "300", "--oracle-seeds", "20"])
    assert "Oracle (means over 20 seeds) within 2 on every readable cell:" in more
