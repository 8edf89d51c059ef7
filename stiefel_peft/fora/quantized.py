"""QFoRA: what a 4-bit (bitsandbytes) base needs before FoRA can score and train it.

bitsandbytes runs NF4 layers on CPU and CUDA. On a CPU with AVX-512 BF16, the first forward
pass in eval mode without gradients (held-out scoring, generation) repacks each layer's weight
into an inference-only format, after which no gradient flows back through the layer: the Fisher
scores and the adapters of every earlier layer would silently get nothing. So a 4-bit model
meant for training must not be repacked; :func:`prepare_quantized` switches the repacking off
(the layer's ``support_avx512bf16_for_cpu`` flag) and refuses a model that was already repacked.
``apply_fora`` calls it on every model; the command line calls it right after loading.
"""

from __future__ import annotations

from torch import nn

__all__ = ["prepare_quantized", "quantized_layers"]


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The bitsandbytes 4-bit linear layers of ``model`` by name (none without bitsandbytes)."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(module).__name__ == "Linear4bit" and hasattr(weight, "quant_state"):
            found[name] = module
    return found


def prepare_quantized(model: nn.Module) -> int:
    """Keep the 4-bit layers of ``model`` trainable; return how many there are.

    Raises:
        ValueError: a layer was already repacked for CPU inference (an eval-mode forward without
            gradients ran before); the message says to load the model again.
    """
    layers = quantized_layers(model)
    repacked = [
        name
        for name, layer in layers.items()
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    ]
    if repacked:
        raise ValueError(
            f"the 4-bit layers {repacked[:3]} (and {max(0, len(repacked) - 3)} more) were "
            "repacked by bitsandbytes for CPU inference (an eval-mode forward without gradients "
            "ran first), and no gradient flows through them now. Load the model again and call "
            "apply_fora (or stiefel_peft.fora.prepare_quantized) before any inference"
        )
    for layer in layers.values():
        layer.support_avx512bf16_for_cpu = False  # never repack: gradients must flow
    return len(layers)
