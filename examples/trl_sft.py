"""FoRA with TRL's ``SFTTrainer``: supervised fine-tuning on prompt/completion pairs.

    pip install 'stiefel_peft[trl]'
    python examples/trl_sft.py            # SmolLM2-135M on Rotten Tomatoes (minutes on CPU)
    python examples/trl_sft.py --fast     # a tiny random Llama on a synthetic rule (seconds)

1. ``apply_fora`` adapts the most informative half of the blocks (scored on a few batches).
2. The ``PeftModel`` goes to ``SFTTrainer`` as it is (no ``peft_config``: the adapter exists),
   with ``optimizers=(fora_optimizer(model), None)``: lora_B stays on the Stiefel manifold,
   one Riemannian step per optimizer step, after accumulation and clipping.
3. SFTTrainer puts the loss on the completions only; the adapter saves as plain LoRA.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from stiefel_peft import apply_fora, fora_optimizer
from stiefel_peft.fora import constrained_parameters
from stiefel_peft.geometry import orthogonality_error

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def tiny_setup(folder: Path) -> tuple[torch.nn.Module, object, Dataset]:
    """A random tiny Llama with a word-level tokenizer; the rule: answer the next number word."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocabulary = ["<unk>", "</s>", "next", ":", *WORDS]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="</s>"
    )
    config = transformers.LlamaConfig(
        vocab_size=len(vocabulary), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        eos_token_id=1, pad_token_id=1, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    pairs = [
        {"prompt": f"next : {WORDS[i]}", "completion": f" {WORDS[(i + 1) % 10]}"}
        for i in range(10)
        for _ in range(8)
    ]
    return model, tokenizer, Dataset.from_list(pairs)


def smollm2_setup() -> tuple[torch.nn.Module, object, Dataset]:
    from stiefel_peft.cli.assets import load_rotten_tomatoes, load_smollm2
    from stiefel_peft.cli.encoding import SENTIMENT_TEMPLATE, split_examples

    model, tokenizer = load_smollm2()
    train, _ = split_examples(load_rotten_tomatoes(), heldout=300, seed=0)
    words = (" negative", " positive")
    pairs = [
        {"prompt": SENTIMENT_TEMPLATE.format(text=e["text"]), "completion": words[e["label"]]}
        for e in train[:512]
    ]
    return model, tokenizer, Dataset.from_list(pairs)


def calibration_batches(tokenizer: object, dataset: Dataset) -> list[dict[str, torch.Tensor]]:
    """A few batches with labels on the completions (the loss SFTTrainer trains)."""
    batches = []
    for start in range(0, 16, 8):
        rows = dataset.select(range(start, start + 8))
        prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
        answers = [
            tokenizer(row["completion"], add_special_tokens=False)["input_ids"] for row in rows
        ]
        width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
        ids = torch.full((8, width), tokenizer.pad_token_id)
        mask = torch.zeros((8, width), dtype=torch.long)
        labels = torch.full((8, width), -100)
        for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            mask[row, : len(prompt) + len(answer)] = 1
            labels[row, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny random model, seconds")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer, dataset = tiny_setup(Path(folder)) if arguments.fast else smollm2_setup()
        rank = 4 if arguments.fast else 32
        model = apply_fora(model, 0.5, calibration=calibration_batches(tokenizer, dataset), r=rank)
        optimizer = fora_optimizer(model, lr=1e-2, stiefel_lr=1e-2)
        config = SFTConfig(
            output_dir=folder, max_steps=30 if arguments.fast else 60,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2, max_grad_norm=1.0, logging_steps=5, save_strategy="no",
            report_to=[], use_cpu=not torch.cuda.is_available(), lr_scheduler_type="constant",
            dataset_num_proc=None, max_length=64,
        )  # fmt: skip
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
            optimizers=(optimizer, None),
        )  # fmt: skip
        result = trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        factors = [p.detach() for _, p in constrained_parameters(model)]
        error = max(float(orthogonality_error(factor)) for factor in factors)
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; largest ||B^T B - I|| = {error:.2e}")
        print(f"trained {result.global_step} optimizer steps with {type(optimizer).__name__}")
        saved = Path(folder) / "adapter"
        model.save_pretrained(saved)
        print(f"saved a plain LoRA adapter: {sorted(path.name for path in saved.iterdir())}")


if __name__ == "__main__":
    main()
