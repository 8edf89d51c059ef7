"""The training loop on transformers' Trainer: the batch order, accumulation, resume, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stiefel_peft.cli.assets import load_model
from stiefel_peft.cli.encoding import ExampleCollator, label_words_for
from stiefel_peft.cli.files import load_classification_file
from stiefel_peft.cli.loss import supervised_loss
from stiefel_peft.cli.trainer import TrainingPlan, fit
from stiefel_peft.cli.training import (
    WARMUP,
    LengthGroupedBatches,
    calibration_batches,
    schedule,
    split_by_tokens,
    warmup_steps,
)
from stiefel_peft.fora import apply_fora, fora_optimizer

TEMPLATE = "Review: {text}\nSentiment (positive or negative):"


def _examples(tiny_csv: Path) -> tuple[list[dict], tuple[str, ...]]:
    return load_classification_file(tiny_csv, "review", "sentiment")


def _adapted(tiny_model_folder: Path, tiny_csv: Path, dropout: float = 0.0):
    model, tokenizer = load_model(tiny_model_folder)
    examples, names = _examples(tiny_csv)
    collate = ExampleCollator(tokenizer, label_words_for(names), TEMPLATE, 24)
    calibration = calibration_batches(examples, collate, 16, torch.device("cpu"), 4)
    model = apply_fora(model, calibration=calibration, r=4, lora_dropout=dropout, seed=0)
    return model, examples, collate


def _adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_batches_are_whole_steps_cut_into_chunks_and_each_epoch_is_reproducible() -> None:
    examples = [{"text": "x" * ((37 * i) % 101)} for i in range(100)]
    sampler = LengthGroupedBatches(examples, batch_size=16, chunk_size=4, seed=3)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == (100 // 16) * 4  # the short last batch is dropped
    assert all(len(chunk) == 4 for chunk in epoch0)
    steps = [sum(epoch0[i : i + 4], []) for i in range(0, len(epoch0), 4)]
    assert len({i for step in steps for i in step}) == 16 * len(steps)  # no example twice
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    again = LengthGroupedBatches(examples, batch_size=16, chunk_size=4, seed=3)
    again.set_epoch(1)
    assert list(again) == epoch1  # a resumed run sees the same order
    with pytest.raises(ValueError, match="must divide the batch size"):
        LengthGroupedBatches(examples, batch_size=16, chunk_size=3, seed=0)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        LengthGroupedBatches(examples[:5], batch_size=16, chunk_size=4, seed=0)


def test_summed_loss_over_a_step_equals_the_mean_loss_of_the_whole_batch(
    tiny_model_folder: Path, tiny_csv: Path
) -> None:
    model, examples, collate = _adapted(tiny_model_folder, tiny_csv)
    batch = collate(examples[:8])
    whole = supervised_loss(model, batch)
    count = int((batch["labels"][:, 1:] != -100).sum())
    parts = sum(
        supervised_loss(model, collate(examples[i : i + 2]), reduction="sum")
        for i in range(0, 8, 2)
    )
    torch.testing.assert_close(parts / count, whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        supervised_loss(model, batch, reduction="none")


def test_token_budget_groups_are_consecutive_rows_trimmed_to_their_own_width() -> None:
    lengths = [3, 4, 4, 6, 9, 12]
    width = 14
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    batch = {"input_ids": torch.arange(6 * width).reshape(6, width), "attention_mask": mask,
             "labels": torch.full((6, width), -100)}  # fmt: skip
    groups = split_by_tokens(batch, budget=12)
    assert [g["input_ids"].shape for g in groups] == [
        torch.Size([3, 4]), torch.Size([1, 6]), torch.Size([1, 9]), torch.Size([1, 12])
    ]  # fmt: skip
    firsts = torch.cat([g["input_ids"][:, :3] for g in groups])
    assert torch.equal(firsts, batch["input_ids"][:, :3])
    assert all(g["input_ids"].numel() <= 12 for g in groups)
    assert len(split_by_tokens(batch, budget=5)) == 6  # a row over budget goes alone
    assert len(split_by_tokens(batch, budget=1000)) == 1
    with pytest.raises(ValueError, match="token budget"):
        split_by_tokens(batch, budget=0)


def test_passes_within_a_token_budget_train_the_same_adapter_as_whole_batches(
    tiny_model_folder: Path, tiny_csv: Path
) -> None:
    results = []
    for budget in (None, 30):
        torch.manual_seed(0)
        model, examples, collate = _adapted(tiny_model_folder, tiny_csv)
        plan = TrainingPlan(steps=4, batch_size=8, micro_batch_tokens=budget, seed=0)
        outcome = fit(model, fora_optimizer(model), examples, collate, plan)
        assert outcome.step == 4
        assert outcome.passes_per_step == 1 if budget is None else outcome.passes_per_step >= 3
        results.append((_adapter(model), outcome.losses))
    assert _max_difference(results[0][0], results[1][0]) <= 1e-5
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_adapter_and_logs_metrics(
    tiny_model_folder: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    plan = TrainingPlan(steps=6, batch_size=8, micro_batch_tokens=40, seed=0, save_every=3,
                        eval_every=2)  # fmt: skip
    model, examples, collate = _adapted(tiny_model_folder, tiny_csv, dropout=0.1)
    calls = []

    def evaluate(trained: torch.nn.Module) -> dict[str, float]:
        calls.append(trained is model)
        trained.eval()  # as the accuracy does; training must continue in train mode
        return {"accuracy": 0.5}

    full = fit(model, fora_optimizer(model), examples, collate, plan, tmp_path / "full",
               evaluate=evaluate)  # fmt: skip
    expected = _adapter(model)
    assert (tmp_path / "full" / "checkpoint-3" / "optimizer.pt").is_file()
    assert full.checkpoint == tmp_path / "full" / "checkpoint-6" and not full.interrupted
    assert calls == [True, True, True]  # steps 2, 4, 6
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [2, 4, 6]
    assert not model.training

    model, examples, collate = _adapted(tiny_model_folder, tiny_csv, dropout=0.1)
    resumed = fit(model, fora_optimizer(model), examples, collate, plan, tmp_path / "resumed",
                  resume=tmp_path / "full" / "checkpoint-3", evaluate=evaluate)  # fmt: skip
    assert resumed.step == 6 and len(resumed.losses) == 3
    assert [record["step"] for record in resumed.evaluations] == [4, 6]
    assert _max_difference(expected, _adapter(model)) <= 1e-6
    assert resumed.losses == full.losses[3:]


def test_the_default_warm_up_is_a_tenth_of_the_steps_floored_and_at_least_one() -> None:
    assert WARMUP == 0.1
    assert [warmup_steps(steps) for steps in range(1000)] == [
        max(1, steps // 10) for steps in range(1000)
    ]  # the schedule every stored run used, binary rounding absorbed (30 * 0.1 = 3.0000...4)
    assert (warmup_steps(48, 0.5), warmup_steps(48, 1.0), warmup_steps(3, 0.2)) == (24, 48, 1)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_a_warm_up_fraction_outside_zero_one_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="warm-up fraction must be in \\(0, 1\\]"):
        warmup_steps(48, fraction)


def test_the_schedule_warms_up_linearly_over_its_fraction_then_decays_as_a_square_root() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = schedule(optimizer, steps=20, warmup=0.25)  # 5 warm-up steps
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [min(1.0, (t + 1) / 5) * ((20 - t) / 20) ** 0.5 for t in range(20)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[4] == pytest.approx(0.8**0.5)  # the peak, at the end of the warm-up (t = 4)


def test_bad_plans_are_refused_before_training(tiny_model_folder: Path, tiny_csv: Path) -> None:
    model, examples, collate = _adapted(tiny_model_folder, tiny_csv)
    optimizer = fora_optimizer(model)
    cases = {
        "micro_batch_tokens must be": TrainingPlan(steps=1, batch_size=8, micro_batch_tokens=0),
        "precision must be one of": TrainingPlan(steps=1, batch_size=8, precision="fp8"),
        "fp16 needs CUDA": TrainingPlan(steps=1, batch_size=8, precision="fp16"),
        "needs an `evaluate`": TrainingPlan(steps=1, batch_size=8, eval_every=1),
        "warm-up fraction must be in": TrainingPlan(steps=1, batch_size=8, warmup=0.0),
    }
    for message, plan in cases.items():
        with pytest.raises(ValueError, match=message):
            fit(model, optimizer, examples, collate, plan)


def test_bf16_autocast_on_the_cpu_trains_and_keeps_float32_factors(
    tiny_model_folder: Path, tiny_csv: Path
) -> None:
    model, examples, collate = _adapted(tiny_model_folder, tiny_csv)
    before = _adapter(model)
    plan = TrainingPlan(steps=2, batch_size=8, micro_batch_tokens=40, precision="bf16")
    outcome = fit(model, fora_optimizer(model), examples, collate, plan)
    after = _adapter(model)
    assert outcome.step == 2 and all(torch.isfinite(torch.tensor(outcome.losses)))
    assert all(value.dtype == torch.float32 for value in after.values())
    assert _max_difference(before, after) > 0
    factor = next(v for k, v in after.items() if ".lora_B." in k)
    gram = factor.T @ factor
    torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
