"""Which linear layers of a block get an adapter, for any naming scheme.

A FoRA adapter is a plain peft LoRA adapter whose ``target_modules`` lists the exact module
names of the adapted layers, so ``save_pretrained`` writes a standard LoRA adapter that peft
alone reloads.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from stiefel_peft.fisher import BlockList
from stiefel_peft.fisher.blocks import is_linear_layer

__all__ = ["DEFAULT_TARGET_SCHEMES", "resolve_targets"]

# The paper adapts q, k, v, up and down (not o, not gate). The same roles in other families:
DEFAULT_TARGET_SCHEMES: dict[str, tuple[str, ...]] = {
    # Llama, Mistral, Qwen2/3, Gemma 1/2/3, and most decoder-only models.
    "llama": ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    # OPT: the MLP is fc1 (up) and fc2 (down).
    "opt": ("q_proj", "k_proj", "v_proj", "fc1", "fc2"),
    # Phi3 fuses q, k, v and gate, up; the fused layers are adapted whole.
    "phi3": ("qkv_proj", "gate_up_proj", "down_proj"),
    # GPT-NeoX: fused qkv; dense_h_to_4h (up), dense_4h_to_h (down).
    "gpt_neox": ("query_key_value", "dense_h_to_4h", "dense_4h_to_h"),
    # GPT-2 family (transformers Conv1D layers): fused qkv c_attn, up c_fc, down mlp.c_proj
    # (attn.c_proj, the o projection, is left out).
    "gpt2": ("c_attn", "c_fc", "mlp.c_proj"),
    # BERT-style encoders: attention.output.dense (the o projection) is left out.
    "bert": (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "intermediate.dense",
        "output.dense",
    ),
}


def _matches(relative_name: str, pattern: str) -> bool:
    if "." in pattern:
        return relative_name == pattern
    return relative_name.rsplit(".", 1)[-1] == pattern


def _block_linears(model: nn.Module, blocks: BlockList) -> list[tuple[str, int, str]]:
    """(full name, block index, name relative to its block) of each linear layer (``nn.Linear``
    or transformers ``Conv1D``) in the blocks."""
    found: list[tuple[str, int, str]] = []
    wrapped: list[str] = []  # peft layers: their insides (base_layer, lora_A, ...) are not targets
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        if isinstance(module, BaseTunerLayer):  # an adapted layer of a PeftModel
            wrapped.append(name)
            module = module.get_base_layer()
        if not is_linear_layer(module):
            continue
        index = blocks.index_of(name)
        if index is None:
            continue
        relative = name[len(blocks.block_name(index)) + 1 :]
        if relative:
            found.append((name, index, relative))
    return found


def resolve_targets(
    model: nn.Module, blocks: BlockList, target_modules: tuple[str, ...] | None
) -> tuple[tuple[str, ...], dict[int, list[str]]]:
    """The target patterns in use and, per block index, the exact module names they match.

    Args:
        model: the base model (names as its ``named_modules()`` yields them).
        blocks: its block list.
        target_modules: patterns (see :class:`~stiefel_peft.fora.config.FoRAConfig`), or None
            for the first scheme of :data:`DEFAULT_TARGET_SCHEMES` whose every pattern matches.

    Raises:
        ValueError: if no default scheme fits (the message lists the model's linear layers), or
            a given pattern matches nothing.
    """
    linears = _block_linears(model, blocks)
    relative_names = sorted({relative for _, _, relative in linears})
    if target_modules is None:
        for patterns in DEFAULT_TARGET_SCHEMES.values():
            if all(any(_matches(r, p) for r in relative_names) for p in patterns):
                target_modules = patterns
                break
        else:
            raise ValueError(
                "no default target scheme fits this model; pass target_modules=(...) with "
                f"names of linear layers inside a block, e.g. from {relative_names[:12]}"
            )
    unmatched = [p for p in target_modules if not any(_matches(r, p) for r in relative_names)]
    if unmatched:
        raise ValueError(
            f"target_modules {unmatched} match no linear layer inside the blocks; the linear "
            f"layers of a block are {relative_names[:20]}"
        )
    per_block: dict[int, list[str]] = {index: [] for index in range(blocks.length)}
    for name, index, relative in linears:
        if any(_matches(relative, pattern) for pattern in target_modules):
            per_block[index].append(name)
    return tuple(target_modules), per_block
