"""FoRA with a plain Hugging Face ``Trainer``.

    python examples/fora_trainer.py     # SmolLM2-135M on Rotten Tomatoes (a few minutes on CPU)
    python examples/fora_trainer.py --fast     # a tiny random Llama on synthetic data (seconds)

1. ``apply_fora`` scores the blocks on a calibration set and adapts the top half.
2. ``fora_optimizer`` is handed to the Trainer: the Stiefel step then runs once per optimizer
   step, after gradient accumulation and clipping.
3. The adapter is saved as a plain LoRA adapter and reloaded with peft alone.
"""

from __future__ import annotations

import argparse
import tempfile

import peft
import torch
import transformers

from stiefel_peft import apply_fora, fora_optimizer
from stiefel_peft.fora import constrained_parameters
from stiefel_peft.geometry import orthogonality_error


def tiny_setup() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], int]:
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    # A learnable rule: the last token is the first token plus one.
    rows = []
    for _ in range(64):
        ids = torch.randint(2, 62, (8,))
        ids[-1] = ids[0] + 1
        labels = torch.full_like(ids, -100)
        labels[-1] = ids[-1]
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return model, rows, 4


def smollm2_setup() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], int]:
    from stiefel_peft.cli.assets import load_rotten_tomatoes, load_smollm2
    from stiefel_peft.cli.encoding import ExampleCollator, label_words_for, split_examples

    model, tokenizer = load_smollm2()
    train, _ = split_examples(load_rotten_tomatoes(), heldout=300, seed=0)
    collate = ExampleCollator(tokenizer, label_words_for(("negative", "positive")), max_length=64)
    rows = []
    for example in train[:256]:
        encoded = collate([example])
        rows.append({key: value[0] for key, value in encoded.items()})
    return model, rows, 32


def pad_collator(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(len(row["input_ids"]) for row in rows)

    def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, width - len(tensor)), value=value)

    return {
        "input_ids": torch.stack([pad(r["input_ids"], 2) for r in rows]),
        "attention_mask": torch.stack([pad(r["attention_mask"], 0) for r in rows]),
        "labels": torch.stack([pad(r["labels"], -100) for r in rows]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help="tiny random model and synthetic data")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default: 30 fast, 24 real)"
    )
    arguments = parser.parse_args()
    model, rows, rank = tiny_setup() if arguments.fast else smollm2_setup()
    calibration = [pad_collator(rows[i : i + 8]) for i in range(0, 32, 8)]
    model = apply_fora(model, budget=0.5, calibration=calibration, r=rank)
    print(model.fora_report.summary())

    with tempfile.TemporaryDirectory() as output:
        args = transformers.TrainingArguments(
            output_dir=output, per_device_train_batch_size=8, gradient_accumulation_steps=2,
            max_steps=arguments.steps or (30 if arguments.fast else 24), max_grad_norm=1.0,
            logging_steps=5, report_to=[], use_cpu=not torch.cuda.is_available(),
            save_strategy="no",
            disable_tqdm=True,
        )  # fmt: skip
        # --fast: a tiny model, few steps, a larger rate; otherwise the library's validated defaults
        rates = {"lr": 1e-2, "stiefel_lr": 1e-2} if arguments.fast else {}
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=rows, data_collator=pad_collator,
            optimizers=(fora_optimizer(model, **rates), None),
        )  # fmt: skip
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        worst = max(
            orthogonality_error(p.detach()).item() for _, p in constrained_parameters(model)
        )
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; largest ||B^T B - I|| = {worst:.1e}")

        model.save_pretrained(output)
        base = tiny_setup()[0] if arguments.fast else None
        if base is not None:
            reloaded = peft.PeftModel.from_pretrained(base, output)
            batch = pad_collator(rows[:4])
            model.eval()
            with torch.no_grad():
                difference = (reloaded(**batch).logits - model(**batch).logits).abs().max().item()
            print(f"reloaded with peft alone: max logit difference {difference:.1e}")


if __name__ == "__main__":
    main()
