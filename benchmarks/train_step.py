"""One training step: FoRA vs peft LoRA on the same blocks vs LoRA on all blocks vs DoRA.

    python benchmarks/train_step.py             # CPU: SmolLM2-135M shape, fp32
    python benchmarks/train_step.py --quick     # fewer repeats, smaller batch
    python benchmarks/train_step.py --cuda      # CUDA: TinyLlama-1.1B and Llama-3.1-8B shapes, bf16

Models are built from configs with random weights (speed and memory do not depend on the
values). FoRA: budget 0.5, r=32, alpha=64, targets q,k,v,up,down, StiefelAdam (exact Cayley)
on lora_B and AdamW on lora_A. "LoRA same blocks": the same adapted modules, torch AdamW.
"LoRA all" / "DoRA all": every block, torch AdamW. Timed round-robin (medians); peak memory as
in ``common.peak_bytes``. Which blocks FoRA picks changes the cost (the backward pass stops at
the lowest adapted block), so the selected blocks are printed and saved.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import peft
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, peak_bytes, time_interleaved, write_json  # noqa: E402

from stiefel_peft.fora import apply_fora, fora_optimizer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
SHAPES = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    ),
    "tinyllama-1.1b": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
    ),
    "tiny": dict(  # for smoke runs (benchmarks/gpu_suite.py --small)
        vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    ),
    "llama-3.1-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    ),
}  # fmt: skip


def build(shape: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    return model.train()


def make_batch(
    vocab: int, batch: int, length: int, device: str, seed: int = 0
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (batch, length), generator=generator)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.to(device),
    }


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def methods(
    shape: str, dtype: torch.dtype, device: str, batch: dict, which: list[str]
) -> tuple[dict, dict]:
    steps, info = {}, {}
    fora = apply_fora(
        build(shape, dtype, device),
        0.5,
        calibration=[make_batch(SHAPES[shape]["vocab_size"], 2, 64, device, seed=1)],
        lora_dropout=0.0,
    )
    info["selected_blocks"] = fora.fora_report.selected_blocks
    info["adapter_parameters"] = fora.fora_report.adapter_parameters
    if "fora" in which:
        steps["fora"] = make_step(fora, fora_optimizer(fora), batch)
    adapted = list(fora.fora_report.adapted_modules)
    if "fora" not in which:
        del fora
        gc.collect()  # peft models hold reference cycles; free the weights before the next
    variants = {
        "lora_same_blocks": dict(target_modules=adapted),
        "lora_all_blocks": dict(target_modules=TARGETS),
        "dora_all_blocks": dict(target_modules=TARGETS, use_dora=True),
    }
    for name, options in variants.items():
        if name not in which:
            continue
        model = peft.get_peft_model(
            build(shape, dtype, device),
            peft.LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, **options),
        )
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=2e-4, foreach=True
        )
        steps[name] = make_step(model, optimizer, batch)
    return steps, info


def run(
    shape: str,
    dtype: torch.dtype,
    device: str,
    batch_size: int,
    length: int,
    repeats: int,
    which: list[str],
) -> dict:
    batch = make_batch(SHAPES[shape]["vocab_size"], batch_size, length, device)
    steps, info = methods(shape, dtype, device, batch, which)
    seconds = time_interleaved(steps, device=device, repeats=repeats, warmup=2)
    peaks = {name: peak_bytes(step, device) for name, step in steps.items()}
    rows = {name: {"ms": 1e3 * seconds[name], "peak_gib": peaks[name] / 2**30} for name in steps}
    ratios = {}
    if "fora" in rows:
        for other in ("lora_same_blocks", "lora_all_blocks", "dora_all_blocks"):
            if other in rows:
                ratios[f"fora/{other}"] = rows["fora"]["ms"] / rows[other]["ms"]
                ratios[f"fora/{other} memory"] = rows["fora"]["peak_gib"] / rows[other]["peak_gib"]
    return {
        "shape": shape,
        "dtype": str(dtype),
        "device": device,
        "batch": [batch_size, length],
        "rows": rows,
        "ratios": ratios,
        **info,
    }


def print_result(result: dict) -> None:
    print(
        f"\n{result['shape']} {result['dtype']} on {result['device']}, "
        f"batch {result['batch'][0]} x {result['batch'][1]}; "
        f"FoRA blocks {result['selected_blocks']}"
    )
    print(
        markdown_table(
            ["method", "ms / step", "peak GiB"],
            [[n, f"{r['ms']:.1f}", f"{r['peak_gib']:.3f}"] for n, r in result["rows"].items()],
        )
    )
    for name, value in result["ratios"].items():
        print(f"  {name}: {value:.3f}x")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batch 2 x 64 on CPU and 3 repeats")
    parser.add_argument(
        "--cuda",
        action="store_true",
        help="run the CUDA shapes (TinyLlama-1.1B, Llama-3.1-8B) in bf16",
    )
    parser.add_argument(
        "--methods", default="fora,lora_same_blocks,lora_all_blocks,dora_all_blocks"
    )
    arguments = parser.parse_args(argv)
    which = arguments.methods.split(",")
    results = []
    if arguments.cuda:
        for shape in ("tinyllama-1.1b", "llama-3.1-8b"):
            results.append(
                run(shape, torch.bfloat16, "cuda", 8, 512, 3 if arguments.quick else 10, which)
            )
            print_result(results[-1])
            torch.cuda.empty_cache()
    else:
        batch, length = (2, 64) if arguments.quick else (4, 128)
        results.append(
            run(
                "smollm2-135m",
                torch.float32,
                "cpu",
                batch,
                length,
                3 if arguments.quick else 6,
                which,
            )
        )
        print_result(results[-1])
    device = "cuda" if arguments.cuda else "cpu"
    path = write_json(
        "train_step_cuda" if arguments.cuda else "train_step",
        {"environment": environment(device), "results": results},
    )
    print(f"\nwrote {path}")
    return {"results": results}


if __name__ == "__main__":
    main()
