"""hypothesis strategies for Stiefel points and tangent vectors."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from stiefel_peft.geometry import project_tangent, random_stiefel


@st.composite
def frame_shapes(draw: st.DrawFn, max_batch_dims: int = 2) -> tuple[int, ...]:
    """(..., n, p) with 0-2 batch dims, 1 <= p <= n <= 40."""
    p = draw(st.integers(1, 8))
    n = draw(st.integers(p, 40))
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=max_batch_dims))
    return (*batch, n, p)


@st.composite
def point_and_tangent(
    draw: st.DrawFn, dtype: torch.dtype = torch.float64, max_norm: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random point and a tangent vector of Frobenius norm in [0, max_norm] per matrix."""
    shape = draw(frame_shapes())
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    x = random_stiefel(*shape, dtype=torch.float64, generator=generator)
    direction = project_tangent(x, torch.randn(shape, dtype=torch.float64, generator=generator))
    direction = direction / direction.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
    norm = draw(st.floats(0.0, max_norm))
    return x.to(dtype), (norm * direction).to(dtype)
