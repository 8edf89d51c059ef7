"""Weight-scaled learning rates: RMS(W), the per-layer groups of fora_optimizer, the settings."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from torch import nn

from stiefel_peft.fora import (
    DEFAULT_LR,
    DEFAULT_RELATIVE_LR,
    DEFAULT_STIEFEL_LR,
    FoRAConfig,
    apply_fora,
    fora_optimizer,
    weight_rms,
    weight_scaled_rates,
)
from stiefel_peft.fora.config import free_factor_rates
from tests.tiny_models import tiny_model_case, train_steps

RANK = 4


def _llama(seed: int = 0) -> nn.Module:
    return tiny_model_case("llama").build(seed=seed)


def _adapted(model: nn.Module, **overrides) -> nn.Module:
    return apply_fora(model, 1.0, r=RANK, lora_dropout=0.0, **overrides)  # every block, no scoring


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "get_base_layer")}


def test_weight_rms_is_the_root_mean_square_and_reads_through_peft_layers() -> None:
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(24, dtype=torch.float32).reshape(4, 6) - 11.5)
    expected = math.sqrt(sum((k - 11.5) ** 2 for k in range(24)) / 24)
    assert weight_rms(layer) == pytest.approx(expected, rel=1e-12)
    model = _adapted(_llama())
    for layer in _layers(model).values():
        base = layer.get_base_layer().weight.detach().double()
        assert weight_rms(layer) == pytest.approx(float(base.pow(2).mean().sqrt()), rel=1e-12)


def test_a_weight_without_scale_is_refused() -> None:
    zero = nn.Linear(3, 3, bias=False)
    nn.init.zeros_(zero.weight)
    with pytest.raises(ValueError, match="non-zero weight; pass an absolute lr"):
        weight_rms(zero)
    with pytest.raises(ValueError, match="no weight"):
        weight_rms(nn.ReLU())


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf"), True])
def test_bad_relative_rates_are_refused_everywhere(bad: float) -> None:
    model = _adapted(_llama())
    with pytest.raises(ValueError, match="relative_lr"):
        weight_scaled_rates(model, "A", "default", bad)
    with pytest.raises(ValueError, match="relative_lr"):
        fora_optimizer(model, relative_lr=bad)
    with pytest.raises(ValueError, match="relative_lr"):
        FoRAConfig(relative_lr=bad)


def _assert_weight_scaled(model: nn.Module, groups: list[dict], relative_lr: float) -> None:
    stiefel, *free = groups
    assert stiefel["stiefel"] and stiefel["lr"] == DEFAULT_STIEFEL_LR
    layers = _layers(model)
    assert len(free) == len(layers)  # one group per adapted layer, nothing else trains
    for group in free:
        (name,) = group["param_names"]
        assert not group["stiefel"] and name.endswith(".lora_A.default.weight")
        layer = layers[name.removesuffix(".lora_A.default.weight")]
        assert group["lr"] == pytest.approx(relative_lr * weight_rms(layer), rel=1e-12)
    assert len({group["lr"] for group in free}) > 1  # the layers differ in scale


def test_by_default_each_free_factor_steps_at_the_default_times_its_weight_rms() -> None:
    assert free_factor_rates(None, None) == (DEFAULT_LR, DEFAULT_RELATIVE_LR)
    model = _adapted(_llama())
    assert (model.fora_config.lr, model.fora_config.relative_lr) == (None, None)
    _assert_weight_scaled(model, fora_optimizer(model).param_groups, DEFAULT_RELATIVE_LR)


def test_an_adapter_reloaded_with_peft_alone_gets_the_default_rates(tmp_path) -> None:
    model = _adapted(_llama())
    model.save_pretrained(tmp_path)  # peft's files and fora_config.json
    (tmp_path / "fora_config.json").unlink()  # as if shared without the FoRA settings
    reloaded = PeftModel.from_pretrained(_llama(), tmp_path, is_trainable=True)
    assert not getattr(reloaded, "fora_configs", None)
    _assert_weight_scaled(reloaded, fora_optimizer(reloaded).param_groups, DEFAULT_RELATIVE_LR)


def test_with_relative_lr_each_layer_a_steps_at_that_times_its_weight_rms() -> None:
    for model, options in (
        (_adapted(_llama()), {"relative_lr": 5e-3}),  # given to the optimizer
        (_adapted(_llama(), relative_lr=5e-3), {}),  # or saved in the adapter's settings
    ):
        _assert_weight_scaled(model, fora_optimizer(model, **options).param_groups, 5e-3)


def test_a_fixed_lr_in_the_settings_makes_every_rate_absolute() -> None:
    assert free_factor_rates(2e-4, None) == (2e-4, None)
    model = _adapted(_llama(), lr=2e-4)
    stiefel, free = fora_optimizer(model).param_groups
    assert stiefel["lr"] == DEFAULT_STIEFEL_LR and free["lr"] == 2e-4
    assert len(free["params"]) == len(_layers(model))


def test_an_lr_given_to_the_optimizer_alone_makes_every_rate_absolute() -> None:
    model = _adapted(_llama(), relative_lr=5e-3)
    stiefel, free = fora_optimizer(model, lr=3e-3, stiefel_lr=2e-3).param_groups
    assert stiefel["lr"] == 2e-3 and free["lr"] == 3e-3
    assert len(free["params"]) == len(_layers(model))


def test_with_both_rates_the_head_takes_lr_and_the_factors_scale() -> None:
    case = tiny_model_case("bert")
    model = apply_fora(case.build(), 1.0, r=RANK, lora_dropout=0.0)
    optimizer = fora_optimizer(model, lr=7e-4, relative_lr=1e-2)
    head = optimizer.param_groups[-1]
    assert all("classifier" in name for name in head["param_names"]) and head["lr"] == 7e-4
    factors = optimizer.param_groups[1:-1]
    assert factors and all(g["param_names"][0].endswith("lora_A.default.weight") for g in factors)
    # Without lr the head takes the adapter's (here the default) rate.
    assert fora_optimizer(model, relative_lr=1e-2).param_groups[-1]["lr"] == DEFAULT_LR
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for g in optimizer.param_groups for p in g["params"])


def test_with_stiefel_factor_a_the_free_lora_b_is_weight_scaled() -> None:
    model = _adapted(_llama(), stiefel_factor="A")
    _, *free = fora_optimizer(model, relative_lr=5e-3).param_groups
    assert free and all(g["param_names"][0].endswith(".lora_B.default.weight") for g in free)


def test_the_relative_rate_round_trips_through_the_settings() -> None:
    config = FoRAConfig(relative_lr=2e-3)
    assert FoRAConfig.from_dict(config.to_dict()) == config
    assert config.with_overrides(lr=1e-3).relative_lr == 2e-3
    # Settings saved before the option existed reload without it, at their fixed lr.
    saved = {k: v for k, v in FoRAConfig(lr=1e-3).to_dict().items() if k != "relative_lr"}
    assert (FoRAConfig.from_dict(saved).lr, FoRAConfig.from_dict(saved).relative_lr) == (
        1e-3,
        None,
    )


def _rescaled(model: nn.Module, scale: float) -> nn.Module:
    """The same function with block 0's q, k, v weights times ``scale`` and their input norm's
    weight divided by it."""
    block = model.model.layers[0]
    with torch.no_grad():
        block.input_layernorm.weight.div_(scale)
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(block.self_attn, name).weight.mul_(scale)
    return model


def _train(model: nn.Module, steps: int, **rates: float) -> torch.Tensor:
    case = tiny_model_case("llama")
    batch = case.make_batch(batch_size=4, seq_len=8, seed=11)
    train_steps(model, fora_optimizer(model, **rates), batch, steps)
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_weight_scaled_training_is_invariant_to_a_rescaled_layer() -> None:
    """W -> s W with the input scaled by 1 / s is the same network; with rates proportional
    to RMS(W) the adapter's update grows by s too, so training follows the same path. An
    absolute rate gives the rescaled layers an update s times too small."""
    torch.manual_seed(0)
    base, scaled = _llama(), _rescaled(_llama(), 4.0)
    relative = {"relative_lr": 2e-2}
    reference = _train(_adapted(base), 8, **relative)
    same = _train(_adapted(scaled), 8, **relative)
    assert torch.allclose(same, reference, atol=1e-4, rtol=1e-4)
    absolute = {"lr": 1e-2}
    reference = _train(_adapted(_llama()), 8, **absolute)
    different = _train(_adapted(_rescaled(_llama(), 4.0)), 8, **absolute)
    assert not torch.allclose(different, reference, atol=1e-3, rtol=1e-3)


def test_with_distance_estimate_the_free_factors_and_head_share_one_estimated_rate() -> None:
    case = tiny_model_case("bert")
    model = apply_fora(case.build(), 1.0, r=RANK, lora_dropout=0.0, relative_lr=5e-3)
    optimizer = fora_optimizer(model, distance_estimate=True)  # the saved relative_lr yields
    stiefel, free = optimizer.param_groups
    assert stiefel["stiefel"] and stiefel["lr"] == DEFAULT_STIEFEL_LR
    assert stiefel["distance_estimate"] is False
    assert free["distance_estimate"] is True and free["lr"] == 1.0  # the multiplier of d
    assert any("classifier" in name for name in free["param_names"])
    assert fora_optimizer(model, lr=0.5, distance_estimate=True).param_groups[1]["lr"] == 0.5
    batch = case.make_batch(batch_size=4, seq_len=8, seed=11)
    losses = train_steps(model, optimizer, batch, 12)
    assert losses[-1] < losses[0]
    assert free["distance"] > free["initial_distance"]  # the estimate grew from 1e-6
    for name, parameter in model.named_parameters():
        if name.endswith("lora_B.default.weight"):
            gram = parameter.detach().T @ parameter.detach()
            torch.testing.assert_close(gram, torch.eye(RANK), atol=1e-4, rtol=0)


def test_distance_estimate_is_refused_with_relative_lr_or_as_a_non_bool() -> None:
    model = _adapted(_llama())
    with pytest.raises(ValueError, match="either `relative_lr`"):
        fora_optimizer(model, relative_lr=5e-3, distance_estimate=True)
    with pytest.raises(ValueError, match="`distance_estimate` must be a bool"):
        fora_optimizer(model, distance_estimate="yes")
