"""Fixtures of the application tests: a tiny local Hugging Face folder (random Llama +
word-level tokenizer), a tiny CSV, and tokenizer-free toys (a toy tokenizer, a tiny Llama)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.cli.toy import LABEL_WORDS, PAD_ID, VOCAB_SIZE, ToyTokenizer

POSITIVE = ["good", "great", "fun", "superb", "lovely"]
NEGATIVE = ["bad", "boring", "awful", "dull", "weak"]
FILLER = ["movie", "plot", "the", "a", "cast", "story"]
TEMPLATE_WORDS = ["Review", ":", "Sentiment", "(", "positive", "or", "negative", ")"]


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    words = ["<unk>", "</s>", *TEMPLATE_WORDS, *POSITIVE, *NEGATIVE, *FILLER]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=1, pad_token_id=1, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    rng = random.Random(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for row in range(120):
            positive = row % 2 == 0
            words = rng.sample(POSITIVE if positive else NEGATIVE, 2) + rng.sample(FILLER, 3)
            rng.shuffle(words)
            writer.writerow([" ".join(words), "positive" if positive else "negative"])
    return path


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
