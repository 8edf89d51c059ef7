"""Squared norms of linear-layer gradients from layer inputs and output gradients.

For ``y_t = W x_t + b`` applied to the tokens ``t = 1..T`` of one example, the gradient of a loss
whose output gradients are ``delta_t = dL/dy_t`` is

.. math::
    \\nabla_W L = \\sum_t \\delta_t x_t^\\top, \\qquad \\nabla_b L = \\sum_t \\delta_t,

so its squared Frobenius norm needs no weight-sized gradient:

.. math::
    \\|\\nabla_W L\\|^2 = \\sum_{t,s} (\\delta_t \\cdot \\delta_s)(x_t \\cdot x_s),
    \\qquad \\|\\nabla_b L\\|^2 = \\sum_{t,s} \\delta_t \\cdot \\delta_s.

Two ways to evaluate it, chosen per call by flop count (:func:`prefers_gram`):

- Gram form: ``sum((X X^T) * (D D^T))``, cost ``O(T^2 (d_in + d_out))``, memory ``T^2``;
- outer form: form ``D^T X`` (``d_out x d_in``) and square it, cost ``O(T d_in d_out)``,
  memory ``d_out d_in`` per example (examples are processed in chunks to bound it).

Pure functions on tensors; nothing here touches a module.
"""

from __future__ import annotations

import torch

__all__ = ["prefers_gram", "squared_gradient_norms", "token_squared_norms"]

# At most this many scalars per intermediate (T^2 per example for the Gram form, d_out * d_in
# per example for the outer form) are held at once: 2^24 fp32 scalars = 64 MiB.
CHUNK_ELEMENTS = 1 << 24


def prefers_gram(tokens: int, in_features: int, out_features: int) -> bool:
    """True when the Gram form is cheaper: ``T^2 (d_in + d_out) < T d_in d_out``."""
    return tokens * (in_features + out_features) < in_features * out_features


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def squared_gradient_norms(
    inputs: torch.Tensor, output_grads: torch.Tensor, *, bias: bool, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ``||sum_t delta_t x_t^T||^2`` and ``||sum_t delta_t||^2``.

    Args:
        inputs: ``x``, shape ``(G, T, d_in)``: G independent groups (examples) of T tokens.
        output_grads: ``delta``, shape ``(G, T, d_out)``, same G and T.
        bias: whether to compute the bias term (else it is returned as zeros).
        method: ``"auto"`` (cheaper of the two by flop count), ``"gram"`` or ``"outer"``.

    Returns:
        ``(weight_norms, bias_norms)``, each of shape ``(G,)`` in float32 (float64 for float64
        inputs).

    Raises:
        ValueError: on mismatched shapes or an unknown ``method``.
    """
    if inputs.dim() != 3 or output_grads.dim() != 3 or inputs.shape[:2] != output_grads.shape[:2]:
        raise ValueError(
            "inputs and output_grads must be (G, T, d_in) and (G, T, d_out) with equal G, T; "
            f"got {tuple(inputs.shape)} and {tuple(output_grads.shape)}"
        )
    if method not in ("auto", "gram", "outer"):
        raise ValueError(f"method must be 'auto', 'gram' or 'outer', got {method!r}")
    groups, tokens, in_features = inputs.shape
    out_features = output_grads.shape[-1]
    dtype = _compute_dtype(inputs.dtype)
    use_gram = method == "gram" or (
        method == "auto" and prefers_gram(tokens, in_features, out_features)
    )
    per_example = tokens * tokens if use_gram else in_features * out_features
    chunk = max(1, CHUNK_ELEMENTS // max(per_example, 1))
    weight_norms, bias_norms = [], []
    for start in range(0, groups, chunk):
        x = inputs[start : start + chunk].to(dtype)  # (g, T, d_in)
        delta = output_grads[start : start + chunk].to(dtype)  # (g, T, d_out)
        if use_gram:
            delta_gram = delta @ delta.transpose(1, 2)  # (g, T, T): delta_t . delta_s
            input_gram = x @ x.transpose(1, 2)  # (g, T, T): x_t . x_s
            weight_norms.append((delta_gram * input_gram).sum(dim=(1, 2)))
        else:
            weight_grad = delta.transpose(1, 2) @ x  # (g, d_out, d_in): sum_t delta_t x_t^T
            weight_norms.append(weight_grad.square().sum(dim=(1, 2)))
        if bias:
            bias_norms.append(delta.sum(dim=1).square().sum(dim=1))  # (g,): ||sum_t delta_t||^2
    weight = torch.cat(weight_norms)
    bias_out = torch.cat(bias_norms) if bias else torch.zeros_like(weight)
    return weight, bias_out


def token_squared_norms(tensor: torch.Tensor) -> torch.Tensor:
    """``||v_t||^2`` for every token: shape ``(..., d) -> (...)``, float32 or float64."""
    return tensor.to(_compute_dtype(tensor.dtype)).square().sum(dim=-1)
