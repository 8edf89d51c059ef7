"""FoRA inside peft's adapter lifecycle: named adapters, saved settings, reload and continue."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch

from stiefel_peft.fora import (
    SETTINGS_FILE,
    apply_fora,
    constrained_parameters,
    fora_optimizer,
    load_fora_adapter,
)
from stiefel_peft.geometry import orthogonality_error
from tests.tiny_models import TinyModelCase, tiny_model_case, train_steps

RANK = 4


def _calibration(case: TinyModelCase) -> list[dict]:
    return [case.make_batch(batch_size=3, seq_len=8, seed=seed) for seed in range(2)]


def _train(model: peft.PeftModel, case: TinyModelCase, steps: int = 6, **options) -> None:
    optimizer = fora_optimizer(model, lr=1e-2, stiefel_lr=1e-2, **options)
    train_steps(model, optimizer, case.make_batch(batch_size=4, seq_len=8, seed=11), steps)


def _factors(model: peft.PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if f".{adapter}." in name and ".lora_" in name
    }


def _orthonormal(model: peft.PeftModel, factor: str, adapter: str) -> float:
    weights = [p.detach() for _, p in constrained_parameters(model, factor, adapter)]
    frames = [w if factor == "B" else w.mT for w in weights]
    return max(float(orthogonality_error(frame)) for frame in frames)


def test_a_second_named_adapter_trains_alone() -> None:
    case = tiny_model_case("llama")
    calibration = _calibration(case)
    model = apply_fora(case.build(), 0.5, calibration=calibration, r=RANK, adapter_name="first")
    _train(model, case)
    first = _factors(model, "first")
    model = apply_fora(model, 0.5, calibration=calibration, r=RANK, adapter_name="second")
    assert set(model.peft_config) == {"first", "second"} and model.active_adapter == "second"
    assert model.fora_reports["second"].extra["adapter_name"] == "second"
    optimizer = fora_optimizer(model)
    names = [n for group in optimizer.param_groups for n in group["param_names"]]
    assert names and all(".second." in name for name in names)
    _train(model, case)
    for name, value in _factors(model, "first").items():  # untouched by the second's training
        assert torch.equal(value, first[name]), name
    assert _orthonormal(model, "B", "second") <= 1e-5
    model.set_adapter("first")
    assert all(".first." in n for g in fora_optimizer(model).param_groups for n in g["param_names"])


@pytest.mark.parametrize("factor", ["B", "A"])
def test_save_reload_with_peft_alone_and_continue_as_fora(factor: str, tmp_path: Path) -> None:
    case = tiny_model_case("qwen3")
    calibration = _calibration(case)
    model = apply_fora(
        case.build(), 0.5, calibration=calibration, r=RANK, stiefel_factor=factor,
        retraction="qr", stiefel_lr=0.02,
    )  # fmt: skip
    _train(model, case)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert saved["config"]["stiefel_factor"] == factor and saved["report"]["selected_blocks"]
    # peft alone: no FoRA settings, the constrained factor is read from the weights
    plain = peft.PeftModel.from_pretrained(case.build(), tmp_path, is_trainable=True)
    optimizer = fora_optimizer(plain)
    assert all(f".lora_{factor}." in n for n in optimizer.param_groups[0]["param_names"])
    _train(plain, case)
    assert _orthonormal(plain, factor, "default") <= 1e-5
    # with the settings: the same factor, retraction and learning rate as before saving
    reloaded = load_fora_adapter(case.build(), tmp_path)
    optimizer = fora_optimizer(reloaded)
    stiefel = optimizer.param_groups[0]
    assert stiefel["retraction"] == "qr" and stiefel["lr"] == 0.02
    assert all(f".lora_{factor}." in n for n in stiefel["param_names"])
    assert reloaded.fora_report.selected_blocks == model.fora_report.selected_blocks


def test_a_named_adapter_is_saved_in_its_folder_with_its_settings(tmp_path: Path) -> None:
    case = tiny_model_case("llama")
    model = apply_fora(
        case.build(), 0.5, calibration=_calibration(case), r=RANK, adapter_name="task"
    )
    model.save_pretrained(tmp_path)
    assert (tmp_path / "task" / "adapter_config.json").is_file()
    assert (tmp_path / "task" / SETTINGS_FILE).is_file()
    reloaded = load_fora_adapter(case.build(), tmp_path / "task", adapter_name="task")
    assert reloaded.fora_configs["task"] == model.fora_configs["task"]


def test_an_adapter_with_no_orthonormal_factor_is_refused() -> None:
    case = tiny_model_case("llama")
    config = peft.LoraConfig(r=RANK, target_modules=["q_proj"], init_lora_weights=True)
    model = peft.get_peft_model(case.build(), config)  # peft's init: A random, B = 0
    with pytest.raises(ValueError, match="not a FoRA adapter"):
        fora_optimizer(model)


def test_lora_settings_pass_through_to_peft() -> None:
    case = tiny_model_case("bert")
    model = apply_fora(
        case.build(), 0.5, calibration=_calibration(case), r=RANK, use_rslora=True, bias="lora_only"
    )
    config = model.peft_config["default"]
    assert config.use_rslora and config.bias == "lora_only"
    for setting in ("layers_to_transform", "layers_pattern", "rank_pattern"):
        with pytest.raises(ValueError, match="FoRA chooses the adapted layers itself"):
            apply_fora(case.build(), 0.5, r=RANK, **{setting: [0]})
