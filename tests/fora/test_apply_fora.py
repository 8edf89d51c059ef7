"""apply_fora over the table of tiny configs: selection, parameters, init, training, save/reload."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn

from stiefel_peft.fora import (
    DEFAULT_LR,
    DEFAULT_STIEFEL_LR,
    FoRAConfig,
    FoRAReport,
    apply_fora,
    constrained_parameters,
    fora_optimizer,
    number_of_selected_blocks,
)
from stiefel_peft.geometry import orthogonality_error
from tests.tiny_models import TINY_MODELS, TinyModelCase, tiny_model_case, train_steps

RANK = 4  # tiny models have k/v projections of 16 outputs
CASES = [pytest.param(case, id=case.name) for case in TINY_MODELS]


def _fora(case: TinyModelCase, budget: float = 0.5, **overrides) -> peft.PeftModel:
    model = case.build(seed=0)
    calibration = [case.make_batch(batch_size=3, seq_len=8, seed=seed) for seed in range(2)]
    return apply_fora(model, budget, calibration=calibration, r=RANK, lora_dropout=0.0, **overrides)


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits


def _train(
    model: peft.PeftModel, case: TinyModelCase, steps: int, **optimizer_options
) -> list[float]:
    optimizer = fora_optimizer(model, **optimizer_options)
    batch = case.make_batch(batch_size=4, seq_len=8, seed=11)
    return train_steps(model, optimizer, batch, steps)


@pytest.mark.parametrize("case", CASES)
def test_half_the_blocks_are_adapted_with_at_most_half_the_parameters(case: TinyModelCase) -> None:
    model = _fora(case)
    report: FoRAReport = model.fora_report
    expected = number_of_selected_blocks(case.num_blocks, 0.5)
    assert report.num_blocks == case.num_blocks
    assert len(report.selected_blocks) == expected
    assert set(report.per_block_scores) == set(range(case.num_blocks))
    top = sorted(report.per_block_scores, key=lambda i: -report.per_block_scores[i])[:expected]
    assert sorted(top) == report.selected_blocks
    # Adapters exist exactly on the reported modules, all inside the selected blocks.
    lora_layers = sorted(
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    )
    assert lora_layers == sorted(report.adapted_modules)
    prefix = case.blocks_path + "."
    for name in lora_layers:
        assert int(name[len(prefix) :].split(".")[0]) in report.selected_blocks
    lora_parameters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora_parameters == report.adapter_parameters
    assert report.adapter_parameters <= 0.5 * report.lora_equivalent_parameters + 1e-9
    assert report.parameter_ratio == pytest.approx(expected / case.num_blocks)


@pytest.mark.parametrize("case", CASES)
def test_the_model_starts_exactly_as_the_base_model(case: TinyModelCase) -> None:
    base = case.build(seed=0)
    batch = case.make_batch(batch_size=3, seq_len=8, seed=5)
    expected = _logits(base, batch)
    model = _fora(case)
    torch.testing.assert_close(_logits(model, batch), expected, atol=0, rtol=0)
    for _, parameter in constrained_parameters(model, "B"):
        assert orthogonality_error(parameter.detach()) <= 1e-5


@pytest.mark.parametrize("case", CASES)
def test_training_keeps_b_orthonormal_and_lowers_the_loss(case: TinyModelCase) -> None:
    model = _fora(case)
    losses = _train(model, case, steps=15, lr=1e-2, stiefel_lr=1e-2)
    assert losses[-1] < losses[0]
    for name, parameter in constrained_parameters(model, "B"):
        assert orthogonality_error(parameter.detach()) <= 1e-5, name
    # The Euclidean factor has moved away from zero.
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_A." in n)


@pytest.mark.parametrize("case", CASES)
def test_saved_adapter_reloads_with_peft_alone_and_merges(case: TinyModelCase, tmp_path) -> None:
    model = _fora(case)
    _train(model, case, steps=3, lr=1e-2, stiefel_lr=1e-2)
    batch = case.make_batch(batch_size=3, seq_len=8, seed=6)
    trained = _logits(model, batch)
    model.save_pretrained(tmp_path)
    model.fora_report.save(tmp_path)
    assert (tmp_path / "adapter_config.json").exists()
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert FoRAReport.load(tmp_path).selected_blocks == model.fora_report.selected_blocks
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert config.peft_type == peft.PeftType.LORA
    reloaded = peft.PeftModel.from_pretrained(case.build(seed=0), tmp_path)
    torch.testing.assert_close(_logits(reloaded, batch), trained, atol=1e-5, rtol=0)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(_logits(merged, batch), trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "case", [pytest.param(tiny_model_case(n), id=n) for n in ("llama", "bert")]
)
def test_stiefel_factor_a_keeps_lora_a_rows_orthonormal(case: TinyModelCase) -> None:
    base_logits = _logits(case.build(seed=0), case.make_batch(seed=5))
    model = _fora(case, stiefel_factor="A")
    torch.testing.assert_close(_logits(model, case.make_batch(seed=5)), base_logits, atol=0, rtol=0)
    losses = _train(model, case, steps=15, lr=1e-2, stiefel_lr=1e-2)
    assert losses[-1] < losses[0]
    factors = constrained_parameters(model, "A")
    assert factors
    for _, parameter in factors:
        assert orthogonality_error(parameter.detach().mT) <= 1e-5  # rows of (r, d_in)


def test_budget_arithmetic() -> None:
    assert number_of_selected_blocks(30, 0.5) == 15
    assert number_of_selected_blocks(3, 0.5) == 1
    assert number_of_selected_blocks(30, 0.3) == 9
    assert number_of_selected_blocks(4, 0.01) == 1
    assert number_of_selected_blocks(7, 1.0) == 7


def test_budget_one_adapts_every_block_without_scoring() -> None:
    case = tiny_model_case("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_fora(case.build(), budget=1.0, r=RANK)
    assert not [w for w in caught if "calibration" in str(w.message)]  # nothing to choose
    assert model.fora_report.selected_blocks == list(range(case.num_blocks))
    assert model.fora_report.per_block_scores is None
    assert model.fora_report.parameter_ratio == 1.0


def test_without_calibration_the_data_free_fallback_warns() -> None:
    case = tiny_model_case("qwen3")
    with pytest.warns(UserWarning, match="calibration"):
        model = apply_fora(case.build(), 0.5, r=RANK)
    assert model.fora_report.data_free
    assert model.fora_report.estimator == "sampled"
    # Deterministic under the seed.
    with pytest.warns(UserWarning):
        again = apply_fora(case.build(), 0.5, r=RANK)
    assert again.fora_report.per_block_scores == model.fora_report.per_block_scores


@pytest.mark.parametrize("budget", [0, -0.5, 1.5, "half", True, float("nan")])
def test_bad_budgets_raise(budget) -> None:
    with pytest.raises(ValueError, match="`budget`"):
        apply_fora(tiny_model_case("llama").build(), budget)


def test_bad_models_and_targets_raise() -> None:
    with pytest.raises(ValueError, match="no nn.ModuleList of repeated blocks"):
        apply_fora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), 0.5, r=2)
    case = tiny_model_case("llama")
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_fora(case.build(), 0.5, r=RANK, target_modules=("query_key_value",))
    with pytest.raises(ValueError, match="`r`=32 is larger than out_features=16"):
        apply_fora(case.build(), 0.5, r=32)
    with pytest.raises(ValueError, match="unknown FoRAConfig fields"):
        apply_fora(case.build(), 0.5, rank=4)
    with pytest.raises(ValueError, match="`stiefel_factor`"):
        FoRAConfig(stiefel_factor="C")
    with pytest.raises(ValueError, match="`estimator`"):
        FoRAConfig(estimator="hessian")
    with pytest.raises(ValueError, match="`retraction`"):
        FoRAConfig(retraction="householder")
    model = apply_fora(case.build(), 1.0, r=RANK)
    with pytest.raises(ValueError, match="`adapter_name` 'default' is taken"):
        apply_fora(model, 0.5, r=RANK)
    with pytest.raises(ValueError, match="not FoRA settings.*plan.with_blocks"):
        apply_fora(case.build(), 0.5, r=RANK, layers_to_transform=[0, 1])
    with pytest.raises(ValueError, match="no trainable lora_B|not a FoRA adapter"):
        fora_optimizer(case.build(), stiefel_factor="B")


def test_config_round_trips_through_a_dict() -> None:
    config = FoRAConfig(budget=0.25, target_modules=("q_proj",), stiefel_factor="A")
    assert FoRAConfig.from_dict(config.to_dict()) == config


def test_fora_optimizer_groups() -> None:
    model = _fora(tiny_model_case("bert"))
    optimizer = fora_optimizer(model, weight_decay=0.1)
    stiefel_group, *factor_groups, head_group = optimizer.param_groups
    assert (
        stiefel_group["stiefel"]
        and stiefel_group["lr"] == DEFAULT_STIEFEL_LR
        and stiefel_group["weight_decay"] == 0
    )
    # By default each free factor has its own weight-scaled rate (tests/fora/test_rates.py).
    assert factor_groups and all(not g["stiefel"] for g in factor_groups)
    assert all(g["weight_decay"] == 0.1 for g in (*factor_groups, head_group))
    # The new classifier head of a sequence classifier is trained in the last AdamW group.
    assert not head_group["stiefel"] and head_group["lr"] == DEFAULT_LR
    head = [n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    assert head and set(head) == set(head_group["param_names"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    grouped = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert trainable == grouped
