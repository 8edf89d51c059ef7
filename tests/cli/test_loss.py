"""supervised_loss: the same loss and gradients as ``model(**batch).loss``, fewer logits."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from stiefel_peft.cli.encoding import IGNORE_INDEX
from stiefel_peft.cli.loss import accepts_logits_to_keep, supervised_logits, supervised_loss
from tests.tiny_models import TINY_MODELS

CAUSAL = [case for case in TINY_MODELS if case.task == "causal_lm"]


def sparse_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only a few answer positions per row, in different columns (prompt/answer shape)."""
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    width = labels.shape[1]
    for row in range(labels.shape[0]):
        column = width - 1 - row % 3
        labels[row, column] = batch["input_ids"][row, column]
    labels[0, 2:4] = batch["input_ids"][0, 2:4]
    return {**batch, "labels": labels}


@pytest.mark.parametrize("case", CAUSAL, ids=[case.name for case in CAUSAL])
def test_equals_the_model_loss_and_its_gradient(case) -> None:
    model = case.build(seed=0, dtype=torch.float64)  # eval mode: no dropout draws to differ
    batch = sparse_labels(case.make_batch(batch_size=4, seq_len=10, seed=1))
    # transformers' own loss upcasts logits to float32; compare at that precision.
    reference = model(**batch).loss
    reference_grads = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    ours = supervised_loss(model, batch)
    grads = torch.autograd.grad(ours, list(model.parameters()), allow_unused=True)
    assert accepts_logits_to_keep(model)
    torch.testing.assert_close(ours.float(), reference.float(), rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(grads, reference_grads, strict=True):
        if theirs is None:
            assert mine is None or torch.count_nonzero(mine) == 0
        else:
            torch.testing.assert_close(mine.float(), theirs.float(), rtol=1e-4, atol=1e-6)


def test_projects_only_the_supervised_columns() -> None:
    case = CAUSAL[0]
    model = case.build(seed=0, dtype=torch.float32)
    batch = sparse_labels(case.make_batch(batch_size=4, seq_len=10, seed=1))
    seen: list[tuple[int, ...]] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    try:
        supervised_loss(model, batch)
    finally:
        handle.remove()
    columns = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0).sum().item()
    assert seen == [torch.Size([4, columns, head.out_features])]
    assert columns < 9


def test_supervised_logits_are_the_full_logits_at_the_supervised_columns() -> None:
    case = CAUSAL[0]
    model = case.build(seed=0, dtype=torch.float64)
    batch = sparse_labels(case.make_batch(batch_size=4, seq_len=10, seed=1))
    logits, targets = supervised_logits(model, batch)
    columns = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, full[:, columns])
    torch.testing.assert_close(targets, batch["labels"][:, 1:][:, columns])


def test_works_through_peft_and_dtype_of_half_models() -> None:
    case = CAUSAL[0]
    base = case.build(seed=0, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=list(case.lora_targets)))
    batch = sparse_labels(case.make_batch(batch_size=3, seq_len=8, seed=2))
    loss = supervised_loss(model, batch)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, model(**batch).loss.float(), rtol=2e-2, atol=2e-2)
    loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


class LogitsOnly(nn.Module):
    """A causal LM without ``logits_to_keep``: the full projection is taken, then indexed."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11)

    def forward(self, input_ids, attention_mask=None):
        return type("Output", (), {"logits": self.head(self.embed(input_ids))})()


def test_model_without_logits_to_keep_gets_the_same_value() -> None:
    torch.manual_seed(0)
    model = LogitsOnly()
    input_ids = torch.randint(0, 11, (2, 5))
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 4] = input_ids[0, 4]
    labels[1, 2] = input_ids[1, 2]
    assert not accepts_logits_to_keep(model)
    logits = model(input_ids).logits
    expected = (
        torch.nn.functional.cross_entropy(logits[0, 3], input_ids[0, 4])
        + torch.nn.functional.cross_entropy(logits[1, 1], input_ids[1, 2])
    ) / 2
    loss = supervised_loss(model, {"input_ids": input_ids, "labels": labels})
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, "needs 'labels'"),
        (
            {
                "input_ids": torch.zeros(2, 4, dtype=torch.long),
                "labels": torch.zeros(2, 3, dtype=torch.long),
            },
            "must have the shape of input_ids",
        ),
        (
            {
                "input_ids": torch.zeros(2, 4, dtype=torch.long),
                "labels": torch.tensor([[1, -100, -100, -100], [-100] * 4]),
            },
            "supervise no token",
        ),
    ],
)
def test_bad_batches_are_refused(batch, message) -> None:
    with pytest.raises(ValueError, match=message):
        supervised_loss(LogitsOnly(), batch)
