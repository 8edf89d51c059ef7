"""Generative classification on a toy tokenizer and a tiny random Llama (fast)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from stiefel_peft.cli.encoding import (
    IGNORE_INDEX,
    Encoded,
    ExampleCollator,
    collate,
    encode_classification,
    encode_prompt_completion,
    label_words_for,
    split_examples,
    to_prompt_completion,
)
from stiefel_peft.cli.scoring import classification_accuracy, label_scores, predict_labels
from tests.cli.toy import EXAMPLES, LABEL_WORDS, PAD_ID, TEMPLATE, ToyTokenizer


def test_label_words_for_adds_a_leading_space() -> None:
    assert label_words_for(["negative", "positive"]) == LABEL_WORDS


@pytest.mark.parametrize("names", [["only"], ["a", "a"], ["a", " "]])
def test_label_words_for_rejects_bad_names(names: list[str]) -> None:
    with pytest.raises(ValueError, match="label_names"):
        label_words_for(names)


def test_encode_classification_is_prompt_then_answer(word_tokenizer: ToyTokenizer) -> None:
    encoded = encode_classification(word_tokenizer, "Fine.", 1, LABEL_WORDS, TEMPLATE, 128)
    assert word_tokenizer.decode(encoded.prompt_ids) == TEMPLATE.format(text="Fine.")
    assert encoded.answer_ids == (word_tokenizer.word_ids[" positive"],)


@pytest.mark.parametrize("max_length", [60, 70, 90])
def test_truncation_cuts_the_text_not_the_template_or_answer(
    char_tokenizer: ToyTokenizer, max_length: int
) -> None:
    text = "word " * 40
    encoded = encode_classification(char_tokenizer, text, 0, LABEL_WORDS, TEMPLATE, max_length)
    assert len(encoded.prompt_ids) + len(encoded.answer_ids) <= max_length
    # The prompt leaves room for the longest answer, whichever label follows.
    assert len(encoded.prompt_ids) <= max_length - max(len(w) for w in LABEL_WORDS)
    prompt = char_tokenizer.decode(encoded.prompt_ids)
    assert prompt.startswith("Review: word")
    assert prompt.endswith("\nSentiment (positive or negative):")
    assert char_tokenizer.decode(encoded.answer_ids) == " negative"
    assert encoded.prompt_ids[0] == 2  # BOS kept


def test_too_small_max_length_raises(word_tokenizer: ToyTokenizer) -> None:
    with pytest.raises(ValueError, match="max_length"):
        encode_classification(word_tokenizer, "Fine.", 1, LABEL_WORDS, TEMPLATE, 20)


def test_template_without_text_field_raises(word_tokenizer: ToyTokenizer) -> None:
    with pytest.raises(ValueError, match="template"):
        encode_classification(word_tokenizer, "Fine.", 1, LABEL_WORDS, "Review:", 128)


def test_label_out_of_range_raises(word_tokenizer: ToyTokenizer) -> None:
    with pytest.raises(ValueError, match="label"):
        encode_classification(word_tokenizer, "Fine.", 2, LABEL_WORDS, TEMPLATE, 128)


def test_prompt_completion_truncates_the_start_of_the_prompt(
    char_tokenizer: ToyTokenizer,
) -> None:
    encoded = encode_prompt_completion(char_tokenizer, "abcdefghij", "XYZ", max_length=8)
    assert char_tokenizer.decode(encoded.prompt_ids) == "fghij"
    assert char_tokenizer.decode(encoded.answer_ids) == "XYZ"
    with pytest.raises(ValueError, match="max_length"):
        encode_prompt_completion(char_tokenizer, "abc", "XYZ", max_length=3)
    with pytest.raises(ValueError, match="completion"):
        encode_prompt_completion(char_tokenizer, "abc", "", max_length=8)


def test_collate_pads_right_and_supervises_only_the_answer() -> None:
    items = [Encoded((5, 6, 7), (8,)), Encoded((5,), (9, 10)), Encoded((4, 4, 4, 4), (11,))]
    batch = collate(items, pad_token_id=PAD_ID)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 0],
        [5, 9, 10, 0, 0],
        [4, 4, 4, 4, 11],
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1] * 5]
    ignore = IGNORE_INDEX
    assert batch["labels"].tolist() == [
        [ignore, ignore, ignore, 8, ignore],
        [ignore, 9, 10, ignore, ignore],
        [ignore] * 4 + [11],
    ]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_rejects_empty_batch_and_missing_pad() -> None:
    with pytest.raises(ValueError, match="at least one"):
        collate([], pad_token_id=0)
    with pytest.raises(ValueError, match="pad_token_id"):
        collate([Encoded((1,), (2,))], pad_token_id=None)  # type: ignore[arg-type]


def test_task_collator_takes_both_kinds(word_tokenizer: ToyTokenizer) -> None:
    collator = ExampleCollator(word_tokenizer, LABEL_WORDS, TEMPLATE, max_length=128)
    pairs = to_prompt_completion(EXAMPLES[:2], LABEL_WORDS, TEMPLATE)
    from_pairs = collator(pairs)
    from_examples = collator(EXAMPLES[:2])
    for key in from_pairs:
        assert torch.equal(from_pairs[key], from_examples[key])
    with pytest.raises(ValueError, match="'prompt' and 'completion'"):
        collator([{"question": "?"}])
    with pytest.raises(ValueError, match="label_words"):
        ExampleCollator(word_tokenizer)(EXAMPLES[:1])


def test_split_is_deterministic_and_a_partition() -> None:
    items = list(range(50))
    train, heldout = split_examples(items, heldout=10, seed=3)
    assert (train, heldout) == split_examples(items, heldout=10, seed=3)
    assert len(heldout) == 10 and sorted(train + heldout) == items
    assert split_examples(items, heldout=10, seed=4)[1] != heldout
    for bad in (-1, 50):
        with pytest.raises(ValueError, match="heldout"):
            split_examples(items, heldout=bad)


def _reference_scores(model, tokenizer, examples, label_words) -> torch.Tensor:
    """One example at a time, no padding, full logits; summed log-probs of each answer."""
    rows = []
    for example in examples:
        row = []
        for label in range(len(label_words)):
            encoded = encode_classification(
                tokenizer, example["text"], label, label_words, TEMPLATE, 128
            )
            ids = torch.tensor([encoded.prompt_ids + encoded.answer_ids])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            start = len(encoded.prompt_ids)
            row.append(
                sum(
                    log_probs[start + i - 1, token].item()
                    for i, token in enumerate(encoded.answer_ids)
                )
            )
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_single_token_scores_match_unpadded_reference(
    tiny_llama, word_tokenizer: ToyTokenizer, batch_size: int
) -> None:
    model = tiny_llama.double()
    with torch.no_grad():
        reference = _reference_scores(model, word_tokenizer, EXAMPLES, LABEL_WORDS)
    scores = label_scores(model, word_tokenizer, EXAMPLES, LABEL_WORDS, batch_size, False, TEMPLATE)
    assert scores.shape == (len(EXAMPLES), 2)
    # Single-token scores are logits: they differ from log-probs by a per-row constant.
    margin = (scores[:, 1] - scores[:, 0]).double()
    torch.testing.assert_close(margin, reference[:, 1] - reference[:, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_multi_token_scores_match_unpadded_reference(
    tiny_llama, char_tokenizer: ToyTokenizer, batch_size: int
) -> None:
    model = tiny_llama.double()
    with torch.no_grad():
        reference = _reference_scores(model, char_tokenizer, EXAMPLES, LABEL_WORDS)
    scores = label_scores(model, char_tokenizer, EXAMPLES, LABEL_WORDS, batch_size, False, TEMPLATE)
    torch.testing.assert_close(scores.double(), reference, rtol=0, atol=1e-5)


def test_scoring_restores_mode_and_leaves_no_gradients(
    tiny_llama, word_tokenizer: ToyTokenizer
) -> None:
    tiny_llama.train()
    predict_labels(tiny_llama, word_tokenizer, EXAMPLES, LABEL_WORDS, template=TEMPLATE)
    assert tiny_llama.training
    assert all(p.grad is None for p in tiny_llama.parameters())
    tiny_llama.eval()
    predict_labels(tiny_llama, word_tokenizer, EXAMPLES, LABEL_WORDS, template=TEMPLATE)
    assert not tiny_llama.training


def test_scoring_works_through_peft(tiny_llama, word_tokenizer: ToyTokenizer) -> None:
    before = label_scores(tiny_llama, word_tokenizer, EXAMPLES, LABEL_WORDS, template=TEMPLATE)
    wrapped = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    after = label_scores(wrapped, word_tokenizer, EXAMPLES, LABEL_WORDS, template=TEMPLATE)
    torch.testing.assert_close(after, before)  # LoRA starts at B = 0


class _ConstantModel(torch.nn.Module):
    """Logits that always prefer one token, whatever the input."""

    def __init__(self, token: int) -> None:
        super().__init__()
        self.token = token
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        width = input_ids.shape[1] if logits_to_keep == 0 else logits_to_keep
        logits = torch.zeros(input_ids.shape[0], width, 128)
        logits[..., self.token] = 1.0
        return type("Output", (), {"logits": logits})()


@pytest.mark.parametrize("preferred_label", [0, 1])
def test_accuracy_counts_matches(word_tokenizer: ToyTokenizer, preferred_label: int) -> None:
    model = _ConstantModel(word_tokenizer.word_ids[LABEL_WORDS[preferred_label]])
    expected = sum(e["label"] == preferred_label for e in EXAMPLES) / len(EXAMPLES)
    accuracy = classification_accuracy(
        model, word_tokenizer, EXAMPLES, LABEL_WORDS, batch_size=2, template=TEMPLATE
    )
    assert accuracy == pytest.approx(expected)


def test_accuracy_rejects_empty_input(tiny_llama, word_tokenizer: ToyTokenizer) -> None:
    with pytest.raises(ValueError, match="at least one"):
        classification_accuracy(tiny_llama, word_tokenizer, [], LABEL_WORDS)
    with pytest.raises(ValueError, match="batch_size"):
        predict_labels(tiny_llama, word_tokenizer, EXAMPLES, LABEL_WORDS, batch_size=0)
