"""experiments (the quality study): the smoke config end to end (resumable, aggregated), the
effective rank, the block selections and every method's trainable-parameter count on a tiny
Llama."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import aggregate, protocol, run
from experiments.methods import METHODS, MethodContext, build_method
from experiments.metrics import effective_rank, lowrank_singular_values, update_metrics
from experiments.models import tiny_llama, word_tokenizer
from experiments.tasks import load_task
from stiefel_peft.cli.training import calibration_batches
from stiefel_peft.fisher import FisherScores, estimate_fisher

CONFIGS = Path(run.__file__).resolve().parent / "configs"
NUM_BLOCKS = 4
# r * (d_in + d_out) per target of the tiny Llama (hidden 64, MLP 128, k/v out 32), 4 blocks.
LORA_R32_ALL = NUM_BLOCKS * 32 * ((64 + 64) + 2 * (64 + 32) + 2 * (64 + 128))


def test_every_config_parses_and_plans() -> None:
    for path in CONFIGS.glob("*.json"):
        config = protocol.load_config(path)
        runs = protocol.plan(config)
        assert len({r.filename() for r in runs}) == len(runs), path  # no two runs share a file


def test_smoke_config_end_to_end_resumes_and_aggregates(tmp_path: Path, monkeypatch) -> None:
    results = tmp_path / "results"
    counts = run.main(
        [str(CONFIGS / "smoke.json"), "--device", "cpu", "--results", str(results), "--quiet"]
    )
    assert counts == {"trained": 4, "skipped": 0, "busy": 0, "total": 4}
    files = sorted((results / "smoke").glob("*.json"))
    assert [f.name for f in files] == [
        "tiny-llama__synthetic_first_word__fora__seed0.json",
        "tiny-llama__synthetic_first_word__lora_r32_all__seed0.json",
        "tiny-llama__synthetic_sentiment__fora__seed0.json",
        "tiny-llama__synthetic_sentiment__lora_r32_all__seed0.json",
    ]
    record = json.loads(files[3].read_text())
    for key in (
        "before",
        "after",
        "trainable_parameters",
        "seconds",
        "steps",
        "lr",
        "selected_blocks",
        "effective_rank_mean",
        "delta_w_fro_total",
    ):
        assert key in record, key
    assert record["trainable_parameters"] == LORA_R32_ALL and record["steps"] == 3
    assert 0 < record["effective_rank_mean"] <= 32 and record["delta_w_fro_total"] > 0
    fora = json.loads(files[2].read_text())
    assert fora["trainable_parameters"] == LORA_R32_ALL // 2
    assert fora["method_info"]["matches_runner_fisher_top"] is True
    stamps = [f.stat().st_mtime_ns for f in files]

    def no_training(*arguments, **keywords):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(run, "run_one", no_training)
    monkeypatch.setattr(run, "Group", no_training)  # not even the model is loaded
    again = run.main(
        [str(CONFIGS / "smoke.json"), "--device", "cpu", "--results", str(results), "--quiet"]
    )
    assert again == {"trained": 0, "skipped": 4, "busy": 0, "total": 4}
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert not list((results / "smoke").glob(".*.tmp"))  # atomic writes leave nothing behind

    docs = tmp_path / "results.md"
    docs.write_text(f"intro\n{aggregate.BEGIN}\nold\n{aggregate.END}\nafter\n")
    text = aggregate.main([str(results / "smoke"), "--docs", str(docs)])
    written = docs.read_text()
    assert written.startswith("intro\n") and written.endswith(f"{aggregate.END}\nafter\n")
    assert "old" not in written and text in written
    assert written.count("| tiny-llama |") == 4 + 2  # 4 runs, then FoRA vs LoRA on each task


def test_runs_claimed_by_a_live_worker_are_left_to_it(tmp_path: Path) -> None:
    config = Path(run.__file__).parent / "configs" / "smoke.json"
    first, *_ = protocol.plan(protocol.load_config(config))
    path = tmp_path / "smoke" / first.filename()
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True)
    lock.write_text(str(os.getppid()))  # a live process that is not us
    assert not run.claim(path)
    counts = run.main([str(config), "--results", str(tmp_path), "--device", "cpu", "--quiet"])
    assert counts == {"trained": 3, "skipped": 0, "busy": 1, "total": 4}
    assert not path.exists() and lock.exists()
    assert not list((tmp_path / "smoke").glob("*__seed0.json.lock"))[1:]  # ours are released


def test_a_lock_of_a_dead_worker_is_taken_over(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    path = tmp_path / "result.json"
    lock = tmp_path / "result.json.lock"
    lock.write_text(finished.stdout.strip())
    assert run.claim(path) and lock.read_text() == str(os.getpid())
    assert run.claim(path)  # our own lock: still ours
    run.release(path)
    assert not lock.exists()


def test_aggregate_mean_and_std_over_seeds() -> None:
    base = {
        "model": "m",
        "task": "t",
        "label": "x",
        "metric": "accuracy",
        "lr": 1e-3,
        "stiefel_lr": None,
        "trainable_parameters": 10,
        "steps": 3,
        "seconds": {"train": 1.0, "total": 2.0},
        "before": 0.5,
        "effective_rank_mean": 2.0,
        "delta_w_fro_total": 1.0,
    }
    rows = aggregate.summarise(
        [
            {**base, "seed": 0, "after": 0.6, "delta": 0.1},
            {**base, "seed": 1, "after": 0.8, "delta": 0.3},
        ]
    )
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1]
    mean, std = rows[0]["after"]
    assert mean == pytest.approx(0.7) and std == pytest.approx(math.sqrt(0.02))


def test_paired_comparisons_and_the_interaction_by_seed() -> None:
    after = {  # label -> after per seed 0, 1, 2 (seed 2 lacks lora_r32_fisher_top)
        "fora": [0.80, 0.70, 0.90],
        "lora_r32_all": [0.75, 0.72, 0.80],
        "lora_r32_fisher_top": [0.70, 0.71],
        "stiefel_b_all": [0.74, 0.74, 0.81],
    }
    results = [
        {"model": "m", "task": "t", "label": label, "seed": seed, "after": value}
        for label, values in after.items()
        for seed, value in enumerate(values)
    ]
    rows = {row["comparison"]: row for row in aggregate.paired(results)}
    first = rows["FoRA vs LoRA r=32 all (claim 1, half the parameters)"]
    assert first["seeds"] == [0, 1, 2] and first["positive"] == 2
    assert first["mean"] == pytest.approx((0.05 - 0.02 + 0.10) / 3)
    interaction = next(row for name, row in rows.items() if name.startswith("2x2"))
    assert interaction["seeds"] == [0, 1]  # only seeds with all four methods
    expected = [(0.80 - 0.70) - (0.74 - 0.75), (0.70 - 0.71) - (0.74 - 0.72)]
    assert interaction["mean"] == pytest.approx(sum(expected) / 2)
    assert interaction["positive"] == 1
    assert "FoRA vs DoRA r=32 all" not in rows  # no DoRA results: left out
    table = aggregate.paired_markdown(aggregate.paired(results))
    claim = "FoRA vs LoRA r=32 all (claim 1, half the parameters)"
    # differences 5, -2, 10 points: mean 4.33, sd 6.03, half width 4.303 * 6.03 / sqrt(3)
    assert f"| m | t | {claim} | +4.3 ± 6.0 | [-10.6, +19.3] | 2 / 1 / 0 |" in table
    low, high = first["interval_95"]
    assert (high - low) / 2 == pytest.approx(4.303 * math.sqrt(109 / 3) / math.sqrt(3) / 100)


def test_effective_rank_matches_a_hand_computation() -> None:
    # sigma = (3, 1, 0): p = (3/4, 1/4), H = -(3/4 ln 3/4 + 1/4 ln 1/4), erank = exp(H)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(torch.tensor([3.0, 1.0, 0.0])) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(1.7547654, rel=1e-6)
    assert effective_rank(torch.full((5,), 2.0)) == pytest.approx(5.0, rel=1e-12)
    assert effective_rank(torch.tensor([1.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank(torch.tensor([1.0, -1.0]))


def test_lowrank_singular_values_equal_those_of_the_dense_product() -> None:
    generator = torch.Generator().manual_seed(0)
    lora_b = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    lora_a = torch.randn(6, 30, generator=generator, dtype=torch.float64)
    dense = torch.linalg.svdvals(2.0 * lora_b @ lora_a)[:6]
    torch.testing.assert_close(
        lowrank_singular_values(lora_b, lora_a, 2.0), dense, rtol=1e-10, atol=1e-10
    )


@pytest.fixture(scope="module")
def tiny_setting():
    tokenizer = word_tokenizer()
    base = tiny_llama(tokenizer, seed=0)
    task = load_task({"name": "synthetic_sentiment", "size": 64, "heldout": 8}, tokenizer, 0, 48)
    calibration = calibration_batches(
        task.train, task.collator(tokenizer), 8, torch.device("cpu"), batch_size=4
    )
    fisher = estimate_fisher(base, calibration, "empirical")
    return base, calibration, fisher


def _context(calibration, fisher: FisherScores, seed: int = 0, per_block=None) -> MethodContext:
    if per_block is not None:
        fisher = FisherScores("empirical", fisher.per_module, per_block, 1, 1, 0.0)
    return MethodContext(
        calibration=calibration, fisher=fisher, seed=seed, lr=1e-3, stiefel_lr=1e-2
    )


def _build(name: str, setting, **context) -> tuple:
    import copy

    base, calibration, fisher = setting
    return build_method(name, copy.deepcopy(base), _context(calibration, fisher, **context))


def test_fisher_bottom_and_random_half_selections(tiny_setting) -> None:
    scores = {0: 1.0, 1: 4.0, 2: 3.0, 3: 2.0}
    _, _, top = _build("lora_r32_fisher_top", tiny_setting, per_block=scores)
    _, _, bottom = _build("lora_r32_bottom_half", tiny_setting, per_block=scores)
    assert top["selected_blocks"] == [1, 2] and bottom["selected_blocks"] == [0, 3]
    draws = {
        tuple(_build("lora_r32_random_half", tiny_setting, seed=s)[2]["selected_blocks"])
        for s in range(6)
    }
    assert all(len(d) == 2 and len(set(d)) == 2 for d in draws)
    assert len(draws) > 1  # the seed matters
    again = _build("lora_r32_random_half", tiny_setting, seed=3)[2]["selected_blocks"]
    assert again == _build("lora_r32_random_half", tiny_setting, seed=3)[2]["selected_blocks"]


def test_trainable_parameters_of_every_method(tiny_setting) -> None:
    half = LORA_R32_ALL // 2
    dora_magnitudes = NUM_BLOCKS * (64 + 32 + 32 + 128 + 64)  # one per output row
    expected = {
        "lora_r32_all": LORA_R32_ALL,
        "lora_r16_all": half,
        "lora_r32_fisher_top": half,
        "lora_r32_random_half": half,
        "lora_r32_bottom_half": half,
        "lora_r32_all_orthoinit": LORA_R32_ALL,
        "stiefel_b_all": LORA_R32_ALL,
        "fora": half,
        "dora_r32_all": LORA_R32_ALL + dora_magnitudes,
        "fora_grad_init": half,
        "fora_sampled": half,
        "fora_random_half": half,
        "fora_fisher_rank": half,  # ranks in proportion, summing to K r on equal-shape blocks
    }
    assert set(expected) | {"fora_module"} == set(METHODS)
    for name, count in expected.items():
        assert _build(name, tiny_setting)[2]["trainable_parameters"] == count, name
    module = _build("fora_module", tiny_setting)[2]
    assert 0 < module["trainable_parameters"] <= half


def test_stiefel_methods_start_orthonormal_at_the_base_model(tiny_setting) -> None:
    for name in ("fora", "fora_grad_init", "fora_module", "stiefel_b_all"):
        model, optimizer, _ = _build(name, tiny_setting)
        frames = [p for n, p in model.named_parameters() if ".lora_B." in n]
        for frame in frames:
            gram = frame.detach().double().mT @ frame.detach().double()
            torch.testing.assert_close(
                gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-5, rtol=0
            )
        assert update_metrics(model)["delta_w_fro_total"] == 0.0  # A = 0: no update yet
        assert any(group.get("stiefel") for group in optimizer.param_groups), name


def test_reasoning_gym_task_scores_exact_match() -> None:
    pytest.importorskip("reasoning_gym")
    from experiments.evaluation import _score

    entry = {
        "name": "reasoning_gym:basic_arithmetic",
        "size": 40,
        "heldout": 10,
        "dataset_options": {"min_terms": 2, "max_terms": 2, "max_digits": 1},
    }
    task = load_task(entry, word_tokenizer(), 0, 64)
    assert task.metric == "exact_match" and len(task.heldout) == 10 and len(task.train) == 30
    example = task.heldout[0]
    assert example["completion"] == f" {example['entry']['answer']}</s>"
    assert _score(task, example["entry"]["answer"], example) == 1.0
    assert _score(task, example["entry"]["answer"] + "1", example) < 1.0


def test_aggregate_reads_single_files_and_refuses_a_run_twice(tmp_path: Path) -> None:
    record = {"model": "m", "task": "t", "label": "fora", "seed": 0, "after": 0.8}
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "m__t__fora__seed0.json").write_text(json.dumps(record))
    lora_file = tmp_path / "first" / "m__t__lora__seed0.json"
    lora_file.write_text(json.dumps({**record, "label": "lora", "after": 0.7}))
    records = aggregate.read_results([tmp_path / "second", lora_file])
    assert sorted(r["label"] for r in records) == ["fora", "lora"]
    with pytest.raises(ValueError, match="aggregate them apart"):
        aggregate.read_results([tmp_path / "first", tmp_path / "second"])
