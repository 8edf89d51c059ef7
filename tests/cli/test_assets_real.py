"""The real packaged assets: SmolLM2-135M-Instruct and Rotten Tomatoes (minutes on CPU).

CI installs the asset packages, so a missing package fails these tests (with the install
command in the MissingAssetError) rather than skipping them.
"""

from __future__ import annotations

import json
import time

import pytest

from stiefel_peft.cli.assets import load_rotten_tomatoes, load_smollm2, smollm2_folder
from stiefel_peft.cli.encoding import (
    SENTIMENT_LABEL_NAMES,
    encode_classification,
    label_words_for,
    split_examples,
)
from stiefel_peft.cli.scoring import classification_accuracy

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def rotten_tomatoes() -> list[dict]:
    return load_rotten_tomatoes()


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2()


def test_rotten_tomatoes_size_and_balance(rotten_tomatoes: list[dict]) -> None:
    assert len(rotten_tomatoes) == 12_752
    positive = sum(e["label"] for e in rotten_tomatoes) / len(rotten_tomatoes)
    assert positive == pytest.approx(0.578, abs=0.001)
    assert {e["label"] for e in rotten_tomatoes} == {0, 1}
    texts = [e["text"] for e in rotten_tomatoes]
    assert len(set(texts)) == len(texts) and all(t.strip() for t in texts)
    assert load_rotten_tomatoes() == rotten_tomatoes  # deterministic order


def test_conversion_is_a_plain_fp32_folder_and_reused() -> None:
    folder = smollm2_folder()
    start = time.perf_counter()
    again = smollm2_folder()
    assert time.perf_counter() - start < 1.0
    assert again == folder
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert (folder / "model.safetensors").stat().st_size > 500e6  # fp32, not 4-bit


def test_model_and_tokenizer(smollm2) -> None:
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.pad_token_id == 2 and tokenizer.padding_side == "right"
    assert tokenizer.encode("Review:")[0] != tokenizer.bos_token_id  # no BOS added


def test_sentiment_answers_are_one_token_each(smollm2, rotten_tomatoes: list[dict]) -> None:
    _, tokenizer = smollm2
    label_words = label_words_for(SENTIMENT_LABEL_NAMES)
    ids = [tokenizer.encode(word, add_special_tokens=False) for word in label_words]
    assert [len(i) for i in ids] == [1, 1] and ids[0] != ids[1]
    # The default max_length never truncates a review.
    lengths = [
        len(encode_classification(tokenizer, e["text"], None, label_words).prompt_ids)
        for e in rotten_tomatoes
    ]
    assert max(lengths) < 127


def test_zero_shot_accuracy_is_above_chance(smollm2, rotten_tomatoes: list[dict]) -> None:
    model, tokenizer = smollm2
    _, heldout = split_examples(rotten_tomatoes, heldout=300, seed=0)
    accuracy = classification_accuracy(
        model, tokenizer, heldout, label_words_for(SENTIMENT_LABEL_NAMES), batch_size=32
    )
    majority = max(sum(e["label"] == k for e in heldout) for k in (0, 1)) / len(heldout)
    assert accuracy >= majority + 0.03  # the label words carry signal before any training
