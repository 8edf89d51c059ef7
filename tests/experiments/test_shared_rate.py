"""experiments.shared_rate: one configuration read against the best of several cells at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import rate_check, shared_rate
from tests.experiments.test_rate_check import record

LOSSES = [0.5] * 5


def cell(task: str, readings: dict[float, list[float]], metric: str = "accuracy") -> list[dict]:
    """Tied rates of one task, ``rate -> reading per seed 0, 1, ...``."""
    results = [
        record(rate, seed, after, LOSSES, task=task)
        for rate, values in readings.items()
        for seed, after in enumerate(values)
    ]
    if metric == "perplexity":
        for result in results:
            result |= {"metric": "perplexity", "higher_is_better": False}
    return results


# two tasks that want rates 4 times apart; 2.5e-4 is 3 points short of arithmetic's best,
# 5 of family's; 1e-3 is 10 short of arithmetic's on every seed
ARITHMETIC = {1.25e-4: [0.30, 0.26, 0.28], 2.5e-4: [0.27, 0.23, 0.25], 5e-4: [0.20, 0.21, 0.22]}
FAMILY = {1.25e-4: [0.60, 0.70, 0.80], 2.5e-4: [0.70, 0.80, 0.75], 5e-4: [0.75, 0.85, 0.80]}


def read(*cells: list[dict], margin: float = 2.0) -> dict:
    entries = rate_check.cell_checks([result for results in cells for result in results])
    return shared_rate.shared_readings(entries, margin)


def test_worst_shortfalls_of_two_cells_that_want_different_rates() -> None:
    reading = read(cell("arithmetic", ARITHMETIC), cell("family", FAMILY))
    arithmetic, family = reading["cells"]
    assert arithmetic == "m / arithmetic (validation)" and family == "m / family (validation)"
    assert reading["best"] == {arithmetic: "0.000125", family: "0.0005"}
    rows = {row["configuration"]: row for row in reading["rows"]}
    assert rows["0.00025"]["readings"][arithmetic]["shortfall"] == pytest.approx(3.0)
    assert rows["0.00025"]["readings"][family]["shortfall"] == pytest.approx(5.0)
    assert rows["0.00025"]["worst"] == pytest.approx(5.0)
    assert rows["0.00025"]["worst_cell"] == family
    assert rows["0.000125"]["worst"] == pytest.approx(10.0)  # family: 70 against 80
    assert rows["0.0005"]["worst"] == pytest.approx(7.0)  # arithmetic: 21 against 28
    # smallest worst shortfall first, and nothing within 2 points on both
    assert [row["configuration"] for row in reading["rows"]] == ["0.00025", "0.0005", "0.000125"]
    assert not any(row["passes"] for row in reading["rows"])


def test_paired_difference_is_per_seed_and_in_points() -> None:
    reading = read(cell("arithmetic", ARITHMETIC), cell("family", FAMILY))
    arithmetic = reading["cells"][0]
    row = next(row for row in reading["rows"] if row["configuration"] == "0.0005")
    difference = row["readings"][arithmetic]["difference"]
    # seeds: 20-30, 21-26, 22-28 -> -10, -5, -6 points
    assert difference["mean"] == pytest.approx(-7.0)
    assert difference["for"] == 0 and difference["against"] == 3
    low, high = difference["interval_95"]
    assert low < -7.0 < high and high < 0


def test_shown_short_needs_the_whole_interval_beyond_the_margin() -> None:
    steady = {1e-3: [0.50, 0.60, 0.70], 2e-3: [0.40, 0.50, 0.60]}  # 10 short on every seed
    noisy = {1e-3: [0.50, 0.60, 0.70], 2e-3: [0.60, 0.30, 0.70]}  # 6.7 short on the mean
    reading = read(cell("steady", steady), cell("noisy", noisy))
    steady_name, noisy_name = "m / steady (validation)", "m / noisy (validation)"
    assert sorted(reading["cells"]) == [noisy_name, steady_name]
    (best, short) = sorted(reading["rows"], key=lambda row: row["configuration"])
    assert best["readings"][steady_name]["is_best"] and best["passes"]
    assert not best["readings"][steady_name]["shown_short"]
    assert short["readings"][steady_name]["shown_short"]
    assert short["readings"][noisy_name]["shortfall"] == pytest.approx(20 / 3)
    assert not short["readings"][noisy_name]["shown_short"]  # its interval reaches above -2
    # a margin above the steady shortfall: neither shown beyond it nor failing it
    wide = read(cell("steady", steady), cell("noisy", noisy), margin=12.0)
    (_, short_wide) = sorted(wide["rows"], key=lambda row: row["configuration"])
    assert not short_wide["readings"][steady_name]["shown_short"] and short_wide["passes"]


def test_a_configuration_within_the_margin_on_every_cell_passes() -> None:
    first = {1e-3: [0.50, 0.60], 2e-3: [0.49, 0.59]}
    second = {1e-3: [0.70, 0.80], 2e-3: [0.71, 0.81]}
    reading = read(cell("first", first), cell("second", second))
    assert [row["passes"] for row in reading["rows"]] == [True, True]
    assert reading["rows"][0]["worst"] == pytest.approx(1.0)
    text = shared_rate.markdown(reading)
    assert "within 2 on every cell: 0.001, 0.002" in text
    assert "shown more than 2 short on some cell: none" in text


def test_perplexity_counts_a_higher_value_as_short() -> None:
    perplexity = {1e-3: [7.0, 7.2, 7.1], 2e-3: [10.0, 10.3, 10.1]}  # 3 above on every seed
    reading = read(cell("accuracy", FAMILY), cell("lm", perplexity, metric="perplexity"))
    lm = reading["cells"][1]
    assert reading["units"][lm] == "perplexity" and reading["digits"][lm] == 2
    # 1e-3 and 2e-3 are not on the family cell: nothing is read on both
    assert reading["rows"] == []
    assert reading["missing"] == {
        "0.000125": [lm],
        "0.00025": [lm],
        "0.0005": [lm],
        "0.001": [reading["cells"][0]],
        "0.002": [reading["cells"][0]],
    }
    other = {1e-3: [7.0, 7.1, 7.0], 2e-3: [7.0, 7.2, 7.1]}
    both = read(cell("other", other, "perplexity"), cell("lm", perplexity, metric="perplexity"))
    row = next(row for row in both["rows"] if row["configuration"] == "0.002")
    lm_reading = row["readings"]["m / lm (validation)"]
    assert lm_reading["shortfall"] == pytest.approx((10.0 + 10.3 + 10.1 - 7.0 - 7.2 - 7.1) / 3)
    assert lm_reading["difference"]["mean"] > 0 and lm_reading["shown_short"]
    assert lm_reading["difference"]["against"] == 3


def test_markdown_names_the_best_and_the_cells_a_configuration_lacks() -> None:
    lone = [record(4e-3, seed, 0.1, LOSSES, task="arithmetic") for seed in range(3)]
    reading = read([*cell("arithmetic", ARITHMETIC), *lone], cell("family", FAMILY))
    text = shared_rate.markdown(reading)
    assert "| 0.000125 | 0 (best) | 10.0: -10.0 [" in text
    assert "smallest worst shortfall: 0.00025, 5.0 (m / family (validation))" in text
    assert "within 2 on every cell: none" in text
    assert "read on some cells only: 0.004 (not on m / family (validation))" in text


@pytest.mark.parametrize(
    ("cells", "seeds", "margin", "match"),
    [
        (["arithmetic"], None, 2.0, "at least two cells"),
        (["arithmetic", "family"], [0], 2.0, "one seed"),
        (["arithmetic", "family"], [0, 5], 2.0, "full seed set"),
        (["arithmetic", "family"], None, -1.0, "margin"),
        (["arithmetic", "family"], None, float("nan"), "margin"),
    ],
)
def test_bad_input_is_refused(
    cells: list[str], seeds: list[int] | None, margin: float, match: str
) -> None:
    tables = {"arithmetic": ARITHMETIC, "family": FAMILY}
    results = [result for name in cells for result in cell(name, tables[name])]
    entries = rate_check.cell_checks(results, seeds)
    with pytest.raises(ValueError, match=match):
        shared_rate.shared_readings(entries, margin)


def test_command_line_reads_result_folders(tmp_path: Path) -> None:
    for index, result in enumerate([*cell("arithmetic", ARITHMETIC), *cell("family", FAMILY)]):
        (tmp_path / f"run{index}.json").write_text(json.dumps(result))
    text = shared_rate.main([str(tmp_path), "--seeds", "0", "1", "--margin", "6"])
    # on seeds 0 and 1: 2.5e-4 is 3 and 5 points short, within 6 on both
    assert "within 6 on every cell: 0.00025" in text
