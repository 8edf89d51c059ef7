"""QFoRA: FoRA on a base model loaded in 4-bit NF4 with bitsandbytes, on the CPU.

The Fisher scores come from the 4-bit layers' inputs and output gradients (no dequantized weight
gradient), the LoRA factors are float32 with the Stiefel factor kept orthonormal, and the adapter
reloads onto a fresh 4-bit base with the same logits.
"""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

from stiefel_peft.fora import (
    apply_fora,
    constrained_parameters,
    fora_optimizer,
    prepare_quantized,
    weight_rms,
)
from stiefel_peft.geometry import orthogonality_error
from tests.tiny_models import tiny_model_case, train_steps

bitsandbytes = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

RANK = 4


def _four_bit(folder: Path) -> torch.nn.Module:
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization, device_map="cpu", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-fp32")
    case = tiny_model_case("llama")
    config = case.make_config()
    config.hidden_size, config.intermediate_size = 64, 128  # NF4 packs blocks of 64 values
    config.head_dim = 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        case.model_class(config).save_pretrained(folder)
    return folder


def test_qfora_scores_trains_orthonormal_and_reloads_on_a_fresh_4bit_base(
    base_folder: Path, tmp_path: Path
) -> None:
    case = tiny_model_case("llama")
    model = _four_bit(base_folder)
    quantized = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    assert quantized, "the base was not loaded in 4-bit"
    calibration = [case.make_batch(batch_size=3, seq_len=8, seed=seed) for seed in range(2)]
    model = apply_fora(model, 0.5, calibration=calibration, r=RANK, lora_dropout=0.0)
    report = model.fora_report
    assert report.per_block_scores and all(v > 0 for v in report.per_block_scores.values())
    assert len(report.selected_blocks) == 1
    for _, factor in constrained_parameters(model):
        assert factor.dtype == torch.float32
    optimizer = fora_optimizer(model, lr=1e-2, stiefel_lr=1e-2)
    batch = case.make_batch(batch_size=4, seq_len=8, seed=11)
    losses = train_steps(model, optimizer, batch, 8)
    assert losses[-1] < losses[0]
    for _, factor in constrained_parameters(model):
        assert orthogonality_error(factor.detach()) <= 1e-5
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        trained = model(**inputs).logits
    model.save_pretrained(tmp_path)
    fresh = _four_bit(base_folder)
    prepare_quantized(fresh)  # the same bitsandbytes kernel path as the trained model's
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained, atol=1e-4, rtol=0)


def test_inference_before_apply_fora_is_refused_not_silently_gradient_free(
    base_folder: Path,
) -> None:
    # bitsandbytes repacks CPU weights for inference at the first no-grad eval forward, after
    # which no gradient flows through them: apply_fora must say so, not score zeros
    case = tiny_model_case("llama")
    model = _four_bit(base_folder)
    batch = case.make_batch(2, 6, 0)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        model(**inputs)
    packed = any(
        getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        for layer in model.modules()
        if isinstance(layer, bitsandbytes.nn.Linear4bit)
    )
    if not packed:
        pytest.skip("this CPU has no AVX-512 BF16: bitsandbytes does not repack here")
    with pytest.raises(ValueError, match="repacked by bitsandbytes.*Load the model again"):
        apply_fora(model, 0.5, calibration=[batch], r=RANK)
    fresh = _four_bit(base_folder)
    prepare_quantized(fresh)
    with torch.no_grad():
        fresh(**inputs)  # inference after prepare_quantized: no repacking
    scores = apply_fora(fresh, 0.5, calibration=[batch], r=RANK).fora_report.per_block_scores
    assert all(value > 0 for value in scores.values())


def test_taylor_refuses_the_packed_4bit_weights(base_folder: Path) -> None:
    from stiefel_peft.fisher import estimate_fisher

    case = tiny_model_case("llama")
    with pytest.raises(ValueError, match="packed or quantized.*'empirical'"):
        estimate_fisher(_four_bit(base_folder), [case.make_batch(2, 6, 0)], "taylor")


def test_weight_scaled_rates_read_the_dequantized_4bit_weight(base_folder: Path) -> None:
    dense = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    model = apply_fora(_four_bit(base_folder), 1.0, r=RANK, lora_dropout=0.0)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "get_base_layer")}
    dense_layers = dict(dense.named_modules())
    for name, layer in layers.items():
        assert isinstance(layer.get_base_layer(), bitsandbytes.nn.Linear4bit)
        original = dense_layers[name.removeprefix("base_model.model.")].weight.double()
        # NF4 keeps each weight within its block's quantization step: the RMS within a few %.
        assert weight_rms(layer) == pytest.approx(float(original.pow(2).mean().sqrt()), rel=0.05)
    _, *free = fora_optimizer(model, relative_lr=5e-3).param_groups
    assert len(free) == len(layers) and all(group["lr"] > 0 for group in free)
