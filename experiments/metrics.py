"""Metrics of a learned LoRA/DoRA update: entropy effective rank and distance from the base.

For an adapted linear layer with factors ``A`` (r x d_in), ``B`` (d_out x r) and scaling
``s = alpha / r`` the low-rank update is ``s B A`` (d_out x d_in). Its singular values are those
of the r x r matrix ``s R_B R_A^T`` where ``B = Q_B R_B`` and ``A^T = Q_A R_A`` are thin QR
factorisations (``s B A = Q_B (s R_B R_A^T) Q_A^T`` with orthonormal ``Q``): O((d_out + d_in) r^2),
never a d_out x d_in matrix for plain LoRA.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["effective_rank", "lowrank_singular_values", "update_metrics"]


def effective_rank(singular_values: Tensor) -> float:
    """Entropy effective rank (Roy and Vetterli 2007): ``exp(-sum_i p_i log p_i)``,
    ``p_i = sigma_i / sum_j sigma_j`` (terms with ``p_i = 0`` contribute 0).

    Between 1 (one non-zero singular value) and the number of singular values (all equal).
    An all-zero update has no direction; its effective rank is defined as 0.

    Args:
        singular_values: (k,) non-negative, any float dtype.

    Raises:
        ValueError: a tensor that is not 1-D or has a negative entry.
    """
    if singular_values.ndim != 1:
        raise ValueError(f"singular_values must be 1-D, got shape {tuple(singular_values.shape)}")
    values = singular_values.detach().double()
    if bool((values < 0).any()):
        raise ValueError("singular_values must be non-negative")
    total = float(values.sum())
    if total == 0.0:
        return 0.0
    p = values[values > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def lowrank_singular_values(lora_b: Tensor, lora_a: Tensor, scaling: float) -> Tensor:
    """Singular values of ``scaling * B @ A`` ((r,) float64, descending) via two thin QRs.

    Args:
        lora_b: (d_out, r). lora_a: (r, d_in). Needs d_out >= r and d_in >= r.
    """
    _, r_b = torch.linalg.qr(lora_b.detach().double())  # (r, r)
    _, r_a = torch.linalg.qr(lora_a.detach().double().mT)  # (d_in, r) -> R (r, r)
    core = scaling * (r_b @ r_a.mT)  # (r, r), same singular values as s B A
    return torch.linalg.svdvals(core)


def _adapted_layers(model: nn.Module, adapter: str) -> list[tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {})
    ]


@torch.no_grad()
def update_metrics(model: nn.Module, adapter: str = "default") -> dict[str, Any]:
    """Effective rank and size of every adapted layer's update, summarised.

    - ``effective_rank_mean``: mean over adapted layers of :func:`effective_rank` of
      ``(alpha / r) B A`` (for DoRA: its low-rank direction update).
    - ``delta_w_fro_total``: ``sqrt(sum_layers ||W' - W||_F^2)``, ``W'`` the effective weight
      (``W + s B A`` for LoRA; for DoRA the merged weight ``m * (W + s B A) / ||W + s B A||_row``,
      computed by peft's own merge, so a d_out x d_in matrix per layer).
    - ``delta_w_fro_mean``: mean over layers of ``||W' - W||_F``.

    Raises:
        ValueError: the model has no LoRA layer with ``adapter``.
    """
    layers = _adapted_layers(model, adapter)
    if not layers:
        raise ValueError(f"model has no LoRA layer with adapter {adapter!r}")
    ranks, norms, per_layer = [], [], {}
    for name, layer in layers:
        lora_a = layer.lora_A[adapter].weight  # (r, d_in)
        lora_b = layer.lora_B[adapter].weight  # (d_out, r)
        scaling = float(layer.scaling[adapter])
        values = lowrank_singular_values(lora_b, lora_a, scaling)
        rank = effective_rank(values)
        variant = getattr(layer, "lora_variant", {}).get(adapter)
        if variant is None:
            norm = float(values.square().sum().sqrt())  # ||s B A||_F from its singular values
        else:
            weight = layer.get_base_layer().weight
            merged = variant.merge_safe(layer, adapter, weight.detach().clone())
            norm = float((merged.double() - weight.double()).norm())
        ranks.append(rank)
        norms.append(norm)
        per_layer[name] = {"effective_rank": rank, "delta_w_fro": norm}
    return {
        "effective_rank_mean": sum(ranks) / len(ranks),
        "effective_rank_max_possible": int(
            min(layer.lora_A[adapter].weight.shape[0] for _, layer in layers)
        ),
        "delta_w_fro_total": math.sqrt(sum(n * n for n in norms)),
        "delta_w_fro_mean": sum(norms) / len(norms),
        "adapted_layers": len(layers),
        "per_layer": per_layer,
    }
