"""A table of tiny transformer configs (random weights) for tests that take a transformer.

Each case builds a seeded model from a ``transformers`` config class (2-4 blocks, hidden 32-64,
vocab 96) and a matching small batch in Hugging Face form: ``input_ids``, ``attention_mask``
(right padding on some rows) and ``labels`` (causal LMs: the input ids with -100 on padding and
on a few random positions, every row keeping at least two label tokens; BERT: class ids).

Usage::

    from tests.tiny_models import TINY_MODELS, tiny_model_case
    for case in TINY_MODELS:
        model = case.build(seed=0, dtype=torch.float64)
        batch = case.make_batch(batch_size=3, seq_len=8, seed=1)
        loss = model(**batch).loss
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn

__all__ = ["TINY_MODELS", "TinyModelCase", "tiny_model_case", "train_steps"]

VOCAB_SIZE = 96
PAD_TOKEN_ID = 0
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TinyModelCase:
    """One tiny model: how to build it, how to batch for it, what LoRA would target.

    Attributes:
        name: short id used in test ids, e.g. ``"llama"``.
        make_config: returns a fresh config.
        model_class: the ``transformers`` model class built from the config.
        num_blocks: number of transformer blocks.
        blocks_path: the dotted name of the block ``nn.ModuleList``.
        lora_targets: module-name suffixes FoRA's default targets (q,k,v,up,down or the
            architecture's equivalent).
        task: ``"causal_lm"`` or ``"sequence_classification"``.
        num_labels: classes for sequence classification (0 for causal LMs).
    """

    name: str
    make_config: Callable[[], transformers.PretrainedConfig]
    model_class: type[nn.Module]
    num_blocks: int
    blocks_path: str
    lora_targets: tuple[str, ...]
    task: str = "causal_lm"
    num_labels: int = 0

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model with weights from ``torch.manual_seed(seed)``, in eval mode, in ``dtype``."""
        config = self.make_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_class(config)
        return model.to(dtype).eval()

    def make_batch(self, batch_size: int = 3, seq_len: int = 8, seed: int = 0) -> dict:
        """A batch of ``batch_size`` rows of ``seq_len`` tokens; odd rows are right-padded.

        Raises:
            ValueError: if ``seq_len < 4`` (too short to pad and keep two label tokens).
        """
        if seq_len < 4:
            raise ValueError(f"seq_len must be >= 4, got {seq_len}")
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(1, VOCAB_SIZE, (batch_size, seq_len), generator=generator)
        attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        for row in range(1, batch_size, 2):  # odd rows lose 1..seq_len-3 trailing tokens
            pad = 1 + int(torch.randint(0, seq_len - 3, (1,), generator=generator))
            attention_mask[row, seq_len - pad :] = 0
        input_ids = input_ids.masked_fill(attention_mask == 0, PAD_TOKEN_ID)
        if self.task == "sequence_classification":
            labels = torch.randint(0, self.num_labels, (batch_size,), generator=generator)
        else:
            labels = input_ids.masked_fill(attention_mask == 0, -100)
            ignored = torch.rand(batch_size, seq_len, generator=generator) < 0.25
            ignored[:, :3] = False  # positions 1 and 2 always stay labelled
            labels = labels.masked_fill(ignored, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _common(**overrides) -> dict:
    base = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    base.update(overrides)
    return base


def _gemma_common(**overrides) -> dict:
    return _common(head_dim=8, **overrides)


TINY_MODELS: list[TinyModelCase] = [
    TinyModelCase(
        "llama", lambda: transformers.LlamaConfig(**_common(num_hidden_layers=3)),
        transformers.LlamaForCausalLM, 3, "model.layers", LLAMA_TARGETS,
    ),
    TinyModelCase(
        "mistral", lambda: transformers.MistralConfig(**_common(sliding_window=4)),
        transformers.MistralForCausalLM, 2, "model.layers", LLAMA_TARGETS,
    ),
    TinyModelCase(
        "qwen2", lambda: transformers.Qwen2Config(**_common(num_hidden_layers=3)),
        transformers.Qwen2ForCausalLM, 3, "model.layers", LLAMA_TARGETS,
    ),
    TinyModelCase(
        "qwen3", lambda: transformers.Qwen3Config(**_common(head_dim=8)),
        transformers.Qwen3ForCausalLM, 2, "model.layers", LLAMA_TARGETS,
    ),
    TinyModelCase(
        "gemma", lambda: transformers.GemmaConfig(**_gemma_common()),
        transformers.GemmaForCausalLM, 2, "model.layers", LLAMA_TARGETS,
    ),
    TinyModelCase(
        # sliding_window > seq_len: with a window of 4, Gemma2's eager attention in float64
        # gives NaN on a padded query row whose window holds only padding.
        "gemma2",
        lambda: transformers.Gemma2Config(
            **_gemma_common(num_hidden_layers=3, sliding_window=16)
        ),
        transformers.Gemma2ForCausalLM, 3, "model.layers", LLAMA_TARGETS,
    ),
    TinyModelCase(
        "gemma3",
        lambda: transformers.Gemma3TextConfig(
            **_gemma_common(num_hidden_layers=4, sliding_window=4, sliding_window_pattern=2)
        ),
        transformers.Gemma3ForCausalLM, 4, "model.layers", LLAMA_TARGETS,
    ),
    TinyModelCase(
        "phi3", lambda: transformers.Phi3Config(**_common()),
        transformers.Phi3ForCausalLM, 2, "model.layers", ("qkv_proj", "gate_up_proj", "down_proj"),
    ),
    TinyModelCase(
        "gpt_neox",
        lambda: transformers.GPTNeoXConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, pad_token_id=PAD_TOKEN_ID,
            tie_word_embeddings=False,
        ),
        transformers.GPTNeoXForCausalLM, 2, "gpt_neox.layers",
        ("query_key_value", "dense_h_to_4h", "dense_4h_to_h"),
    ),
    TinyModelCase(
        "opt",
        lambda: transformers.OPTConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
            pad_token_id=PAD_TOKEN_ID, tie_word_embeddings=False,
        ),
        transformers.OPTForCausalLM, 2, "model.decoder.layers",
        ("q_proj", "k_proj", "v_proj", "fc1", "fc2"),
    ),
    TinyModelCase(
        # GPT-2: transformers Conv1D layers (weight stored (in, out)), fused qkv in c_attn
        "gpt2",
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB_SIZE, n_embd=32, n_layer=4, n_head=4, n_positions=64,
            pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        ),
        transformers.GPT2LMHeadModel, 4, "transformer.h", ("c_attn", "c_fc", "mlp.c_proj"),
    ),
    TinyModelCase(
        # BERT's down projection is "<block>.output.dense", which as a suffix would also match
        # "<block>.attention.output.dense" (the o_proj equivalent); it is left out on purpose.
        "bert",
        lambda: transformers.BertConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, pad_token_id=PAD_TOKEN_ID,
            num_labels=3,
        ),
        transformers.BertForSequenceClassification, 2, "bert.encoder.layer",
        ("query", "key", "value", "intermediate.dense"),
        task="sequence_classification", num_labels=3,
    ),
]


def tiny_model_case(name: str) -> TinyModelCase:
    """The case called ``name``.

    Raises:
        ValueError: for an unknown name.
    """
    for case in TINY_MODELS:
        if case.name == name:
            return case
    raise ValueError(f"unknown tiny model {name!r}; known: {[c.name for c in TINY_MODELS]}")


def train_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, steps: int
) -> list[float]:
    """``steps`` optimizer steps of ``model`` on one batch in train mode (its own ``.loss``),
    then eval mode; the losses before each step."""
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
