"""Find the repeated transformer blocks of a model and the linear layers inside them.

The FoRA frontend reuses this module: it scores and selects *blocks*, so both sides must agree
on which ``nn.ModuleList`` holds the blocks and on how a module name maps to a block index.

Detection is structural, not by attribute name: the blocks are the longest ``nn.ModuleList``
whose children all share one class and which is not nested inside another such list (so the
experts list inside a mixture-of-experts layer is never mistaken for the blocks). This finds
``model.layers`` (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi3), ``gpt_neox.layers``,
``model.decoder.layers`` (OPT) and ``encoder.layer`` (BERT), with or without a peft wrapper:
module names are always exactly those of ``model.named_modules()`` of the model passed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BlockList",
    "block_index",
    "dense_weight",
    "find_blocks",
    "is_linear_layer",
    "layer_features",
    "linear_modules",
    "resolve_modules",
]


def _conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2 family), if transformers is imported (else no model
    can hold one)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None) if module is not None else None


def is_linear_layer(module: nn.Module) -> bool:
    """An ``nn.Linear`` (subclasses too: peft's and bitsandbytes' layers) or a transformers
    ``Conv1D``, whose weight is stored ``(in, out)`` and which computes ``x W + b``."""
    if isinstance(module, nn.Linear):
        return True
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def layer_features(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear layer (``nn.Linear`` or ``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.nx, module.nf  # Conv1D: weight (nx, nf)


def dense_weight(module: nn.Module, name: str, purpose: str) -> torch.Tensor:
    """The layer's weight as a dense ``(d_out, d_in)`` floating tensor (a view for Conv1D).

    Raises:
        ValueError: the weight is packed or quantized (bitsandbytes 4-bit, for example): its
            shape or dtype is not that of the layer; ``purpose`` names what needed it.
    """
    d_in, d_out = layer_features(module)
    weight = module.weight
    if not isinstance(module, nn.Linear):
        weight = weight.mT  # Conv1D stores (in, out)
    if tuple(weight.shape) != (d_out, d_in) or not weight.is_floating_point():
        raise ValueError(
            f"{purpose} needs a plain dense weight of shape (out, in) = {(d_out, d_in)}, but "
            f"module {name!r} ({type(module).__name__}) holds a weight of shape "
            f"{tuple(module.weight.shape)} and dtype {module.weight.dtype} (a packed or "
            "quantized layer); use estimator='empirical', which needs only the layer's inputs "
            "and output gradients"
        )
    return weight


@dataclass(frozen=True)
class BlockList:
    """Where the repeated blocks of a model live.

    Attributes:
        path: dotted name of the ``nn.ModuleList`` as ``model.named_modules()`` yields it,
            e.g. ``"model.layers"`` or, under peft, ``"base_model.model.model.layers"``.
        length: number of blocks L; block indices are ``0 .. L-1``.
        block_class: class name of the blocks, e.g. ``"LlamaDecoderLayer"``.
    """

    path: str
    length: int
    block_class: str

    def index_of(self, module_name: str) -> int | None:
        """The block index of ``module_name`` (a name from ``named_modules()``), or None.

        ``"model.layers.3.mlp.down_proj"`` -> 3 for ``path="model.layers"``; the block itself
        (``"model.layers.3"``) also maps to 3; a module outside the list maps to None.
        """
        prefix = self.path + "."
        if not module_name.startswith(prefix):
            return None
        head = module_name[len(prefix) :].split(".", 1)[0]
        if not head.isdigit() or int(head) >= self.length:
            return None
        return int(head)

    def block_name(self, index: int) -> str:
        """The module name of block ``index``, e.g. ``"model.layers.3"``.

        Raises:
            ValueError: if ``index`` is not in ``0 .. length-1``.
        """
        if not 0 <= index < self.length:
            raise ValueError(f"index must be in 0..{self.length - 1}, got {index}")
        return f"{self.path}.{index}"


def _is_homogeneous_list(module: nn.Module) -> bool:
    children = list(module.children())
    return (
        isinstance(module, nn.ModuleList)
        and len(children) > 0
        and len({type(child) for child in children}) == 1
    )


def find_blocks(model: nn.Module) -> BlockList:
    """Locate the ``nn.ModuleList`` of repeated blocks of ``model``.

    Rule: among the ``nn.ModuleList`` s whose children are non-empty and all of one class, drop
    those nested inside another such list, then take the longest; ties go to the first in
    ``named_modules()`` order. Cost: one walk over the module tree.

    Raises:
        ValueError: if the model holds no such list (for example a bare ``nn.Linear`` or an
            ``nn.Sequential`` model); pass ``modules=`` explicitly to the Fisher estimators
            in that case.
    """
    candidates = [
        (name, module) for name, module in model.named_modules() if _is_homogeneous_list(module)
    ]
    outermost = [
        (name, module)
        for name, module in candidates
        if not any(other != name and name.startswith(other + ".") for other, _ in candidates)
    ]
    if not outermost:
        raise ValueError(
            f"found no nn.ModuleList of repeated blocks in {type(model).__name__}; to score "
            "its linear layers anyway, pass their names (modules=[...]); the model must also "
            "take the batch's keys as keyword arguments and return .logits and .loss, as "
            "Hugging Face models do"
        )
    best_name, best_module = max(outermost, key=lambda item: len(item[1]))  # first max wins
    first_child = next(iter(best_module.children()))
    return BlockList(
        path=best_name, length=len(best_module), block_class=type(first_child).__name__
    )


def block_index(module_name: str, blocks: BlockList) -> int | None:
    """The block index of ``module_name`` under ``blocks`` (see :meth:`BlockList.index_of`)."""
    return blocks.index_of(module_name)


def linear_modules(model: nn.Module, blocks: BlockList | None = None) -> dict[str, nn.Module]:
    """Every linear layer (:func:`is_linear_layer`) inside the blocks, keyed by its
    ``named_modules()`` name, in order.

    Under peft this includes the wrapped ``...q_proj.base_layer`` and the adapter's
    ``...q_proj.lora_A.default`` / ``lora_B.default`` layers, since all are ``nn.Linear``.

    Raises:
        ValueError: if no blocks are found (see :func:`find_blocks`).
    """
    blocks = find_blocks(model) if blocks is None else blocks
    return {
        name: module
        for name, module in model.named_modules()
        if is_linear_layer(module) and blocks.index_of(name) is not None
    }


def resolve_modules(
    model: nn.Module, modules: Iterable[str] | None, blocks: BlockList | None
) -> dict[str, nn.Module]:
    """The linear layers to score: the default set, or exactly the names given.

    Args:
        model: the model whose ``named_modules()`` names are used.
        modules: None for every linear layer inside the blocks, or an iterable of exact module
            names (any ``nn.Linear`` or ``Conv1D`` of the model, also outside the blocks, e.g.
            ``"lm_head"``).
        blocks: the block list, or None when the model has none (then ``modules`` is required).

    Raises:
        ValueError: ``modules`` is a single string, empty, names an unknown module, or names
            a module that is not an ``nn.Linear``.
    """
    if modules is None:
        if blocks is None:
            raise ValueError("the model has no block list; pass modules=[...] explicitly")
        return linear_modules(model, blocks)
    if isinstance(modules, str):
        raise ValueError(
            f"modules must be an iterable of module names, not one string: pass [{modules!r}]"
        )
    wanted = list(dict.fromkeys(modules))
    if not wanted:
        raise ValueError("modules is empty; pass None for every nn.Linear in the blocks")
    by_name = dict(model.named_modules())
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise ValueError(
            f"unknown module names {unknown[:5]}; pass names exactly as model.named_modules() "
            f"yields them, e.g. {[n for n, m in by_name.items() if is_linear_layer(m)][:3]}"
        )
    not_linear = [name for name in wanted if not is_linear_layer(by_name[name])]
    if not_linear:
        raise ValueError(
            f"modules must name linear layers (nn.Linear or Conv1D); these are not: "
            f"{not_linear[:5]}"
        )
    return {name: by_name[name] for name in wanted}
