"""Tokenizer-free fixtures for the data tests: a toy tokenizer and a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.data.toy import LABEL_WORDS, PAD_ID, VOCAB_SIZE, ToyTokenizer


@pytest.fixture
def word_tokenizer() -> ToyTokenizer:
    """Label words are single tokens."""
    return ToyTokenizer(words=LABEL_WORDS)


@pytest.fixture
def char_tokenizer() -> ToyTokenizer:
    """Label words are several tokens, and a BOS token starts each prompt."""
    return ToyTokenizer(add_bos=True)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
    )
    return LlamaForCausalLM(config).eval()
