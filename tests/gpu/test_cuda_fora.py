"""FoRA invariants in bf16 on CUDA: output unchanged at init, orthonormal lora_B after steps,
a host-sync-free optimizer step, and save/reload through peft alone. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch

from stiefel_peft.fora import apply_fora, constrained_parameters, fora_optimizer
from stiefel_peft.geometry import orthogonality_error
from tests.gpu.test_cuda_optim import no_host_sync
from tests.tiny_models import TinyModelCase, tiny_model_case
from tests.tolerances import CLOSE, orthonormal_tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICE = "cuda"
RANK = 4  # the tiny models have k/v projections of 16 outputs
DTYPE = torch.bfloat16


def on_device(batch: dict, device: str) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def base_model(case: TinyModelCase, device: str) -> torch.nn.Module:
    return case.build(seed=0, dtype=DTYPE).to(device)


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


def fora_model(case: TinyModelCase, device: str) -> peft.PeftModel:
    calibration = [on_device(case.make_batch(3, 8, seed=seed), device) for seed in range(2)]
    return apply_fora(
        base_model(case, device), 0.5, calibration=calibration, r=RANK, lora_dropout=0.0
    )


def train(model: peft.PeftModel, case: TinyModelCase, steps: int, device: str) -> None:
    optimizer = fora_optimizer(model, lr=1e-2, stiefel_lr=5e-2)
    model.train()
    for index in range(steps):
        batch = on_device(case.make_batch(4, 8, seed=20 + index), device)
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        if index == 0:
            optimizer.step()  # the first step checks orthonormality (one sync)
            continue
        with no_host_sync():
            optimizer.step()


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_fora_bf16_on_cuda_init_steps_and_reload(name: str, tmp_path: Path) -> None:
    case = tiny_model_case(name)
    batch = on_device(case.make_batch(4, 8, seed=3), DEVICE)
    model = fora_model(case, DEVICE)
    assert next(model.parameters()).device.type == "cuda"
    # output unchanged at init (B A = 0)
    torch.testing.assert_close(
        logits(model, batch), logits(base_model(case, DEVICE), batch), atol=CLOSE[DTYPE], rtol=0
    )
    before = {n: p.detach().clone() for n, p in constrained_parameters(model)}
    train(model, case, steps=6, device=DEVICE)
    for name_, param in constrained_parameters(model):
        assert param.device.type == "cuda"
        assert (param.detach() - before[name_]).abs().max() > 0  # trained
        bound = orthonormal_tolerance(param.dtype, param.shape[-1])
        assert orthogonality_error(param.detach()).item() <= bound, name_
    trained = logits(model, batch)
    assert (trained - logits(base_model(case, DEVICE), batch)).abs().max() > 0
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(base_model(case, DEVICE), tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), trained, atol=CLOSE[DTYPE], rtol=0)
