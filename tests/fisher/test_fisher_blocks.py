"""Block detection over the tiny model table, under peft, and on synthetic module trees."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from stiefel_peft.fisher import BlockList, block_index, estimate_fisher, find_blocks, linear_modules
from stiefel_peft.fisher.blocks import resolve_modules
from tests.tiny_models import TINY_MODELS, tiny_model_case


@pytest.mark.parametrize("case", TINY_MODELS, ids=lambda case: case.name)
def test_blocks_of_every_tiny_model(case):
    model = case.build()
    blocks = find_blocks(model)
    assert blocks.path == case.blocks_path
    assert blocks.length == case.num_blocks
    names = dict(model.named_modules())
    assert isinstance(names[blocks.path], nn.ModuleList)
    linears = linear_modules(model, blocks)
    assert {blocks.index_of(name) for name in linears} == set(range(case.num_blocks))
    for suffix in case.lora_targets:  # every LoRA target exists once in every block
        hits = [name for name in linears if name.endswith("." + suffix)]
        assert sorted(blocks.index_of(name) for name in hits) == list(range(case.num_blocks))


def test_block_index_and_block_name():
    blocks = BlockList(path="model.layers", length=3, block_class="LlamaDecoderLayer")
    assert block_index("model.layers.2.mlp.down_proj", blocks) == 2
    assert block_index("model.layers.1", blocks) == 1
    assert block_index("model.layers", blocks) is None
    assert block_index("model.layers.3.mlp", blocks) is None  # past the end
    assert block_index("model.layers_extra.0.q", blocks) is None
    assert block_index("lm_head", blocks) is None
    assert blocks.block_name(0) == "model.layers.0"
    with pytest.raises(ValueError, match="index must be in 0..2"):
        blocks.block_name(3)


def test_peft_wrapped_model_keeps_exact_names():
    case = tiny_model_case("llama")
    model = case.build(dtype=torch.float64)
    config = peft.LoraConfig(r=2, target_modules=list(case.lora_targets), lora_dropout=0.1)
    wrapped = peft.get_peft_model(model, config)
    blocks = find_blocks(wrapped)
    assert blocks.path == "base_model.model.model.layers" and blocks.length == case.num_blocks
    names = set(dict(wrapped.named_modules()))
    scores = estimate_fisher(wrapped, [case.make_batch(2, 6, 0)])
    assert set(scores.per_module) <= names
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in scores.per_module
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default" in scores.per_module
    assert sorted(scores.per_block) == list(range(case.num_blocks))


def test_base_layer_scores_equal_under_a_zero_adapter():
    """peft's B = 0 at init: the wrapped base layers score exactly as the bare model's layers."""
    case = tiny_model_case("qwen2")
    batch = case.make_batch(3, 8, 1)
    bare = estimate_fisher(case.build(dtype=torch.float64), [batch]).per_module
    wrapped_model = peft.get_peft_model(
        case.build(dtype=torch.float64),
        peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]),
    )
    wrapped = estimate_fisher(wrapped_model, [batch]).per_module
    for name, score in bare.items():
        peft_name = "base_model.model." + name
        peft_name = peft_name + ".base_layer" if peft_name + ".base_layer" in wrapped else peft_name
        assert wrapped[peft_name] == pytest.approx(score, rel=1e-9)


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)


class _MoeBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(_Expert() for _ in range(8))


def test_nested_longer_lists_do_not_win():
    model = nn.Module()
    model.layers = nn.ModuleList(_MoeBlock() for _ in range(3))
    blocks = find_blocks(model)
    assert (blocks.path, blocks.length, blocks.block_class) == ("layers", 3, "_MoeBlock")


def test_mixed_class_lists_are_not_blocks():
    model = nn.Module()
    model.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.Tanh()])
    model.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    assert find_blocks(model).path == "blocks"


def test_model_without_blocks_raises():
    with pytest.raises(ValueError, match="no nn.ModuleList of repeated blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_resolve_modules_errors():
    model = tiny_model_case("llama").build()
    blocks = find_blocks(model)
    with pytest.raises(ValueError, match="not one string"):
        resolve_modules(model, "lm_head", blocks)
    with pytest.raises(ValueError, match="unknown module names"):
        resolve_modules(model, ["model.layers.0.q_proj"], blocks)
    with pytest.raises(ValueError, match="nn.Linear"):
        resolve_modules(model, ["model.layers.0.input_layernorm"], blocks)
    with pytest.raises(ValueError, match="empty"):
        resolve_modules(model, [], blocks)
    assert list(resolve_modules(model, ["lm_head", "lm_head"], blocks)) == ["lm_head"]
