"""The squared-norm primitive against explicit per-example gradients (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stiefel_peft.fisher.norms import prefers_gram, squared_gradient_norms
from tests.tolerances import CLOSE

shapes = st.tuples(
    st.integers(1, 4),
    st.integers(1, 9),
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(0, 2**16),
)


def dense(x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.stack(
        [  # (G, d_out, d_in): sum_t delta_t x_t^T, one outer product at a time
            sum(torch.outer(d, v) for d, v in zip(dn, xn, strict=True))
            for dn, xn in zip(delta, x, strict=True)
        ]
    )
    return weight.square().sum(dim=(1, 2)), delta.sum(dim=1).square().sum(dim=1)


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from(["auto", "gram", "outer"]))
def test_both_forms_equal_the_explicit_gradient(shape, method):
    groups, tokens, d_in, d_out, seed = shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, tokens, d_in, generator=generator, dtype=torch.float64)
    delta = torch.randn(groups, tokens, d_out, generator=generator, dtype=torch.float64)
    weight, bias = squared_gradient_norms(x, delta, bias=True, method=method)
    expected_weight, expected_bias = dense(x, delta)
    scale = float(expected_weight.abs().max()) + 1.0
    torch.testing.assert_close(weight, expected_weight, rtol=0, atol=CLOSE[torch.float64] * scale)
    torch.testing.assert_close(bias, expected_bias, rtol=0, atol=CLOSE[torch.float64] * scale)
    assert weight.dtype == torch.float64


def test_chunking_does_not_change_the_result(monkeypatch):
    from stiefel_peft.fisher import norms

    x = torch.randn(5, 7, 6, dtype=torch.float64)
    delta = torch.randn(5, 7, 3, dtype=torch.float64)
    whole = squared_gradient_norms(x, delta, bias=True)
    monkeypatch.setattr(norms, "CHUNK_ELEMENTS", 1)  # one example per chunk
    for method in ("gram", "outer"):
        chunked = squared_gradient_norms(x, delta, bias=True, method=method)
        torch.testing.assert_close(chunked, whole)


def test_low_precision_inputs_are_accumulated_in_float32():
    x = torch.randn(2, 5, 8).to(torch.bfloat16)
    delta = torch.randn(2, 5, 4).to(torch.bfloat16)
    weight, _ = squared_gradient_norms(x, delta, bias=False)
    expected, _ = dense(x.double(), delta.double())
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=1e-5)


def test_cost_rule():
    assert prefers_gram(tokens=16, in_features=576, out_features=1536)
    assert not prefers_gram(tokens=2048, in_features=576, out_features=576)


def test_bad_shapes_and_method_raise():
    with pytest.raises(ValueError, match="inputs and output_grads"):
        squared_gradient_norms(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4), bias=False)
    with pytest.raises(ValueError, match="method"):
        squared_gradient_norms(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), bias=False, method="x")
