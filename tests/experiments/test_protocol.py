"""The second-round protocol: choices on a validation split, the test split read only with the
chosen rates, and the language-modelling task on the convention speeches."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from experiments import aggregate, protocol, run
from experiments.evaluation import evaluate
from experiments.models import tiny_llama, word_tokenizer
from experiments.tasks import load_task, speech_chunks

TINY = {"name": "tiny-llama", "source": "tiny_llama", "options": {"seed": 0}}
SENTIMENT = {"name": "synthetic_sentiment", "size": 96, "heldout": 16, "validation": 12}
COMMON = {
    "models": [TINY],
    "tasks": [SENTIMENT],
    "methods": ["lora_r32_all", "fora"],
    "steps": 2,
    "batch_size": 4,
    "calibration_examples": 8,
    "calibration_batch_size": 4,
    "max_length": 48,
}


def _write(folder: Path, name: str, config: dict) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def test_validation_split_is_disjoint_from_test_and_train() -> None:
    task = load_task(SENTIMENT, word_tokenizer(), split_seed=0, max_length=48)
    assert len(task.split("validation")) == 12 and len(task.split("test")) == 16
    assert len(task.train) == 96 - 16 - 12
    keys = [[(e["text"], e["label"]) for e in part] for part in (task.train, task.validation)]
    test = [(e["text"], e["label"]) for e in task.heldout]
    assert sorted(keys[0] + keys[1] + test) == sorted(
        (e["text"], e["label"])
        for e in load_task({**SENTIMENT, "validation": 0}, word_tokenizer(), 0, 48).train
        + load_task({**SENTIMENT, "validation": 0}, word_tokenizer(), 0, 48).heldout
    )  # a partition: nothing lost, nothing shared
    plain = load_task({**SENTIMENT, "validation": 0}, word_tokenizer(), 0, 48)
    assert plain.heldout == task.heldout  # asking for validation leaves the test split alone
    with pytest.raises(ValueError, match='set "validation"'):
        plain.split("validation")


def test_a_fresh_test_split_is_disjoint_and_leaves_test_and_validation_alone() -> None:
    fresh = load_task({**SENTIMENT, "fresh_test": 10}, word_tokenizer(), 0, 48)
    plain = load_task(SENTIMENT, word_tokenizer(), 0, 48)
    assert fresh.heldout == plain.heldout and fresh.validation == plain.validation
    assert len(fresh.split("fresh_test")) == 10 and len(fresh.train) == len(plain.train) - 10
    key = lambda part: [(e["text"], e["label"]) for e in part]  # noqa: E731
    assert sorted(key(fresh.train) + key(fresh.fresh_test)) == sorted(key(plain.train))
    with pytest.raises(ValueError, match='"fresh_test": N'):
        plain.split("fresh_test")
    with pytest.raises(ValueError, match='no "fresh_test" split'):
        load_task({"name": "convention_speeches", "fresh_test": 5}, word_tokenizer(), 0, 48)


def test_a_fresh_test_config_reads_only_the_fresh_split(tmp_path: Path) -> None:
    config = _write(tmp_path, "fresh", {
        **COMMON, "tasks": [{**SENTIMENT, "fresh_test": 10}], "methods": ["fora"],
        "evaluate_on": "fresh_test", "learning_rates": {"stiefel": [[1e-3, 1e-3]]},
    })  # fmt: skip
    results = tmp_path / "results"
    run.main([str(config), "--device", "cpu", "--results", str(results), "--quiet"])
    (record,) = [json.loads(p.read_text()) for p in (results / "fresh").glob("*.json")]
    assert record["split"] == "fresh_test" and record["heldout_examples"] == 10
    with pytest.raises(ValueError, match="'fresh_test'"):
        protocol.load_config(_write(tmp_path, "bad", {**COMMON, "evaluate_on": "retest"}))


def test_a_sweep_on_validation_chooses_the_rates_that_the_test_config_runs(tmp_path: Path) -> None:
    sweep = _write(tmp_path, "sweep", {
        **COMMON, "evaluate_on": "validation",
        "learning_rates": {"adamw": [1e-3, 3e-2], "stiefel": [[1e-3, 1e-3], [3e-2, 3e-2]]},
    })  # fmt: skip
    results = tmp_path / "results"
    counts = run.main([str(sweep), "--device", "cpu", "--results", str(results), "--quiet"])
    assert counts["trained"] == 4
    records = [json.loads(p.read_text()) for p in (results / "sweep").glob("*.json")]
    assert {r["split"] for r in records} == {"validation"}
    assert {r["heldout_examples"] for r in records} == {12}
    chosen = protocol.chosen_learning_rates("sweep", results)
    for method in ("lora_r32_all", "fora"):
        mine = [r for r in records if r["method"] == method]
        best = max(mine, key=lambda r: (r["after"], -r["lr"]))
        assert chosen[("tiny-llama", "synthetic_sentiment", method)] == (
            best["lr"], best["stiefel_lr"], None, None, None
        )  # fmt: skip

    final = _write(tmp_path, "final", {
        **COMMON, "seeds": [0, 1], "learning_rates_from": "sweep", "evaluate_on": "test",
    })  # fmt: skip
    runs = protocol.plan(protocol.load_config(final), results)
    assert len(runs) == 4 and all("-lr" not in r.label for r in runs)
    for spec in runs:
        rates = (spec.lr, spec.stiefel_lr, spec.relative_lr, spec.gradient_lr, spec.estimated_lr)
        assert rates == chosen[(spec.model, spec.task, spec.method)]

    for record_path in (results / "sweep").glob("*.json"):  # a sweep scored on test is refused
        record = json.loads(record_path.read_text())
        record_path.write_text(json.dumps({**record, "split": "test"}))
        break
    with pytest.raises(ValueError, match="must be scored on validation"):
        protocol.plan(protocol.load_config(final), results)
    with pytest.raises(ValueError, match="no results"):
        protocol.chosen_learning_rates("missing", results)


def test_a_validation_run_always_names_its_rates(tmp_path: Path) -> None:
    one_rate = {**COMMON, "learning_rates": {"adamw": [1e-3], "stiefel": [[5e-4, 5e-4]]}}
    extension = _write(tmp_path, "extension", {**one_rate, "evaluate_on": "validation"})
    labels = {r.method: r.label for r in protocol.plan(protocol.load_config(extension), tmp_path)}
    assert labels == {"lora_r32_all": "lora_r32_all-lr0.001", "fora": "fora-lr0.0005-slr0.0005"}
    final = _write(tmp_path, "final", {**one_rate, "evaluate_on": "test"})
    labels = {r.method: r.label for r in protocol.plan(protocol.load_config(final), tmp_path)}
    assert labels == {"lora_r32_all": "lora_r32_all", "fora": "fora"}  # a test row: the method


def test_a_weight_scaled_a_rate_is_named_chosen_and_replayed(tmp_path: Path) -> None:
    rates = {"adamw": [1e-3], "stiefel": [[5e-4, 5e-4], [{"relative": 5e-3}, 1e-3]]}
    sweep = _write(tmp_path, "scaled", {**COMMON, "learning_rates": rates, "methods": ["fora"],
                                        "evaluate_on": "validation"})  # fmt: skip
    specs = protocol.plan(protocol.load_config(sweep), tmp_path)
    assert [(s.label, s.lr, s.relative_lr) for s in specs] == [
        ("fora-lr0.0005-slr0.0005", 5e-4, None),
        ("fora-rlr0.005-slr0.001", None, 5e-3),
    ]
    folder = tmp_path / "chosen"
    folder.mkdir()
    for index, (lr, relative, value) in enumerate([(5e-4, None, 0.7), (None, 5e-3, 0.8)]):
        record = {"model": "m", "task": "t", "method": "fora", "lr": lr, "stiefel_lr": 1e-3,
                  "relative_lr": relative, "after": value, "split": "validation"}  # fmt: skip
        (folder / f"r{index}.json").write_text(json.dumps(record))
    assert protocol.chosen_learning_rates("chosen", tmp_path) == {
        ("m", "t", "fora"): (None, 1e-3, 5e-3, None, None)
    }
    final = _write(tmp_path, "final", {**COMMON, "models": [{"name": "m", "source": "tiny_llama"}],
                                       "tasks": [{"name": "t"}], "methods": ["fora"],
                                       "seeds": [0], "learning_rates_from": "chosen"})  # fmt: skip
    (spec,) = protocol.plan(protocol.load_config(final), tmp_path)
    assert (spec.lr, spec.stiefel_lr, spec.relative_lr) == (None, 1e-3, 5e-3)


def test_a_weight_scaled_run_trains_and_records_its_rates(tmp_path: Path) -> None:
    rates = {"stiefel": [[{"relative": 1e-2}, 1e-3]]}
    config = _write(tmp_path, "scaled", {**COMMON, "methods": ["fora"], "learning_rates": rates,
                                         "evaluate_on": "validation"})  # fmt: skip
    results = tmp_path / "results"
    assert (
        run.main([str(config), "--device", "cpu", "--results", str(results), "--quiet"])["trained"]
        == 1
    )
    (path,) = (results / "scaled").glob("*.json")
    record = json.loads(path.read_text())
    assert record["label"] == "fora-rlr0.01-slr0.001"
    assert (record["lr"], record["stiefel_lr"], record["relative_lr"]) == (None, 1e-3, 1e-2)
    spread = record["method_info"]["free_factor_lr"]
    assert 0 < spread["min"] <= spread["mean"] <= spread["max"] < 1e-2  # RMS(W) < 1 here


def test_a_config_warm_up_trains_under_it_and_is_recorded(tmp_path: Path) -> None:
    assert protocol.DEFAULTS["warmup"] == 0.1  # the schedule of every run stored before the key
    config = _write(tmp_path, "long_warmup", {**COMMON, "methods": ["fora"], "warmup": 0.5,
                                              "learning_rates": {"stiefel": [[1e-3, 1e-3]]},
                                              "evaluate_on": "validation"})  # fmt: skip
    results = tmp_path / "results"
    run.main([str(config), "--device", "cpu", "--results", str(results), "--quiet"])
    (path,) = (results / "long_warmup").glob("*.json")
    assert json.loads(path.read_text())["warmup"] == 0.5


@pytest.mark.parametrize("warmup", [0, 1.5, -0.1])
def test_a_warm_up_outside_zero_one_is_refused(tmp_path: Path, warmup: float) -> None:
    config = _write(tmp_path, "bad", {**COMMON, "warmup": warmup})
    with pytest.raises(ValueError, match="`warmup`: the warm-up fraction must be in"):
        protocol.load_config(config)


def test_a_gradient_scaled_run_trains_records_its_rate_and_is_replayed(tmp_path: Path) -> None:
    rates = {"stiefel": [[{"gradient": 1e-4}, None]]}
    config = _write(tmp_path, "graded", {**COMMON, "methods": ["fora"], "learning_rates": rates,
                                         "evaluate_on": "validation"})  # fmt: skip
    results = tmp_path / "results"
    assert (
        run.main([str(config), "--device", "cpu", "--results", str(results), "--quiet"])["trained"]
        == 1
    )
    (path,) = (results / "graded").glob("*.json")
    record = json.loads(path.read_text())
    assert record["label"] == "fora-glr0.0001"
    assert (record["lr"], record["stiefel_lr"], record["gradient_lr"]) == (None, None, 1e-4)
    rate = record["method_info"]["gradient_rate"]
    assert rate > 0 and math.isfinite(rate)
    final = _write(tmp_path, "final", {**COMMON, "methods": ["fora"], "seeds": [1],
                                       "learning_rates_from": "graded"})  # fmt: skip
    (spec,) = protocol.plan(protocol.load_config(final), results)
    assert (spec.lr, spec.stiefel_lr, spec.relative_lr) == (None, None, None)
    assert spec.gradient_lr == 1e-4
    rows = aggregate.summarise(aggregate.read_results([results / "graded"]))
    assert f"0.0001 / sqrt(g) = {rate:.2g}" in aggregate.markdown(rows)


def test_an_estimated_rate_run_trains_records_its_trajectory_and_is_replayed(
    tmp_path: Path,
) -> None:
    rates = {"stiefel": [[{"estimated": 1.0}, 1e-3]]}
    config = _write(tmp_path, "estimated", {**COMMON, "methods": ["fora"], "steps": 6,
                                            "learning_rates": rates,
                                            "evaluate_on": "validation"})  # fmt: skip
    results = tmp_path / "results"
    assert (
        run.main([str(config), "--device", "cpu", "--results", str(results), "--quiet"])["trained"]
        == 1
    )
    (path,) = (results / "estimated").glob("*.json")
    record = json.loads(path.read_text())
    assert record["label"] == "fora-elr1-slr0.001"
    assert (record["lr"], record["stiefel_lr"], record["estimated_lr"]) == (None, 1e-3, 1.0)
    trajectory = record["method_info"]["estimated_rate"]
    assert len(trajectory) == 6 and trajectory == sorted(trajectory)  # one per step, never down
    assert trajectory[-1] > 1e-6  # it grew from StiefelAdam's initial_distance
    final = _write(tmp_path, "final", {**COMMON, "methods": ["fora"], "seeds": [1],
                                       "learning_rates_from": "estimated"})  # fmt: skip
    (spec,) = protocol.plan(protocol.load_config(final), results)
    assert (spec.lr, spec.stiefel_lr, spec.estimated_lr) == (None, 1e-3, 1.0)
    rows = aggregate.summarise(aggregate.read_results([results / "estimated"]))
    assert f"1 x d, final d = {trajectory[-1]:.2g} / 0.001" in aggregate.markdown(rows)


@pytest.mark.parametrize(
    "rates",
    [
        {"adamw": [{"relative": 5e-3}], "stiefel": [[5e-4, 5e-4]]},
        {"adamw": [1e-3], "stiefel": [[{"scaled": 5e-3}, 1e-3]]},
        {"adamw": [1e-3], "stiefel": [5e-4]},
        {"adamw": [1e-3], "stiefel": [[5e-4, None]]},  # only a gradient-scaled A ties B to it
        {"adamw": [1e-3], "stiefel": [[{"relative": 5e-3}, None]]},
        {"adamw": [1e-3], "stiefel": [[{"gradient": 1e-4, "relative": 5e-3}, None]]},
        {"adamw": [1e-3], "stiefel": [[{"estimated": 1.0}, None]]},  # B's rate stays explicit
    ],
)
def test_malformed_rate_entries_are_refused(tmp_path: Path, rates: dict) -> None:
    config = _write(tmp_path, "bad", {**COMMON, "learning_rates": rates})
    with pytest.raises(ValueError, match="learning_rates"):
        protocol.load_config(config)


def test_lower_is_better_metrics_choose_the_lowest(tmp_path: Path) -> None:
    folder = tmp_path / "sweep"
    folder.mkdir()
    for index, (lr, value) in enumerate([(1e-3, 9.0), (2e-3, 7.5), (4e-3, 8.0)]):
        record = {"model": "m", "task": "t", "method": "fora", "lr": lr, "stiefel_lr": lr,
                  "after": value, "split": "validation", "higher_is_better": False}  # fmt: skip
        (folder / f"r{index}.json").write_text(json.dumps(record))
    assert protocol.chosen_learning_rates("sweep", tmp_path) == {
        ("m", "t", "fora"): (2e-3, 2e-3, None, None, None)
    }


def test_a_list_of_sweeps_pools_their_seeds_per_rate(tmp_path: Path) -> None:
    def write(folder: str, seed: int, lr: float, value: float) -> None:
        (tmp_path / folder).mkdir(exist_ok=True)
        record = {"model": "m", "task": "t", "method": "fora", "lr": lr, "stiefel_lr": lr,
                  "after": value, "split": "validation", "seed": seed}  # fmt: skip
        (tmp_path / folder / f"{lr}-{seed}.json").write_text(json.dumps(record))

    write("sweep", 0, 1e-3, 0.80)
    write("sweep", 0, 2e-3, 0.82)  # seed 0 alone chooses 2e-3 ...
    write("seeds", 1, 1e-3, 0.81)
    write("seeds", 1, 2e-3, 0.60)  # ... which collapses on seed 1
    assert protocol.chosen_learning_rates("sweep", tmp_path)[("m", "t", "fora")] == (
        2e-3,
        2e-3,
        None,
        None,
        None,
    )
    pooled = protocol.chosen_learning_rates(["sweep", "seeds"], tmp_path)
    assert pooled == {("m", "t", "fora"): (1e-3, 1e-3, None, None, None)}  # mean 0.805 against 0.71
    with pytest.raises(ValueError, match="'missing': no results"):
        protocol.chosen_learning_rates(["sweep", "missing"], tmp_path)


def test_speech_chunks_respect_the_token_budget_and_keep_every_word() -> None:
    tokenizer = word_tokenizer(("<pad>", "<unk>", "</s>", "a", "b", "c", "d"))
    speech = "a b c d a b\nc d\n" + " ".join(["a"] * 25) + "\nb c"
    chunks = speech_chunks([speech], tokenizer, chunk_tokens=8)
    assert all(len(tokenizer.encode(c["completion"])) <= 8 for c in chunks)
    assert all(c["prompt"] == "" for c in chunks)
    assert " ".join(c["completion"] for c in chunks).split() == speech.split()


def test_convention_speeches_split_by_speech_and_score_perplexity() -> None:
    tokenizer = word_tokenizer()
    entry = {"name": "convention_speeches", "test_speeches": 5, "validation_speeches": 5,
             "chunk_tokens": 32, "train_examples": 40}  # fmt: skip
    task = load_task(entry, tokenizer, split_seed=0, max_length=48)
    assert task.metric == "perplexity" and not task.higher_is_better
    assert task.info["speeches"] == 189 and len(task.train) == 40
    test = {c["completion"] for c in task.heldout}
    validation = {c["completion"] for c in task.validation}
    assert test and validation
    assert all(len(c.split()) < 8 for c in test & validation)  # only stage directions
    torch.manual_seed(0)
    model = tiny_llama(tokenizer, seed=0)
    task.heldout = task.heldout[:8]
    result = evaluate(model, tokenizer, task, "test")
    assert result["tokens"] > 0 and result["perplexity"] > 1.0
    assert math.isclose(result["perplexity"], math.exp(result["nll"]), rel_tol=1e-9)


def test_paired_perplexity_counts_a_lower_value_in_favour() -> None:
    from experiments import aggregate

    records = [
        {
            "model": "m",
            "task": "lm",
            "label": label,
            "seed": seed,
            "after": value,
            "higher_is_better": False,
        }  # fmt: skip
        for seed, (fora, random_half) in enumerate([(7.0, 7.3), (7.1, 7.2), (7.4, 7.3)])
        for label, value in (("fora", fora), ("fora_random_half", random_half))
    ]
    (row,) = [r for r in aggregate.paired(records) if r["comparison"].startswith("Fisher top")]
    assert row["positive"] == 2 and row["negative"] == 1
    assert abs(row["mean"] - (-0.3 - 0.1 + 0.1) / 3) < 1e-12
    text = aggregate.paired_markdown([row])
    assert "-0.100" in text and "2 / 1 / 0" in text


def test_differences_summary_counts_ties_apart_and_reads_the_sign_by_direction() -> None:
    from experiments.aggregate import differences_summary, interval_95

    differences = [0.02, -0.01, 0.0, 0.05]
    higher = differences_summary(differences, higher_is_better=True)
    assert higher["for"] == 2 and higher["against"] == 1  # the tie is neither
    assert math.isclose(higher["mean"], 0.015, abs_tol=1e-15)
    assert math.isclose(higher["std"], statistics.stdev(differences), rel_tol=1e-12)
    assert higher["interval_95"] == list(interval_95(differences))
    lower = differences_summary(differences, higher_is_better=False)  # perplexity: lower wins
    assert lower["for"] == 1 and lower["against"] == 2
    assert lower["interval_95"] == higher["interval_95"]  # the interval is the differences'
