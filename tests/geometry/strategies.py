"""hypothesis strategies for Stiefel points and tangent vectors.

Shapes: mostly small frames (1 <= p <= 8, p <= n <= 40, never the degenerate St(1, 1) =
{-1, 1}, which has no tangent direction), and one draw in four a production shape of a FoRA
factor (p up to 64, n up to 4096). Dtypes: drawn from float32, float64 and bfloat16 unless a
test fixes one.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from stiefel_peft.geometry import project_tangent, random_stiefel

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# q/down and k/v of SmolLM2-135M, its up_proj, TinyLlama's r = 16, Llama-8B-like r = 64 heads
PRODUCTION_SHAPES = ((576, 32), (192, 32), (1536, 32), (2048, 16), (4096, 64))


@st.composite
def frame_shapes(
    draw: st.DrawFn, max_batch_dims: int = 2, production: bool = True
) -> tuple[int, ...]:
    """(..., n, p): 0-2 batch dims of 1-3 and a small frame, or (n, p) of a real factor."""
    if production and draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(PRODUCTION_SHAPES))
    p = draw(st.integers(1, 8))
    n = draw(st.integers(max(p, 2), 40))
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=max_batch_dims))
    return (*batch, n, p)


@st.composite
def point_and_tangent(
    draw: st.DrawFn,
    dtype: torch.dtype | None = torch.float64,
    max_norm: float = 1.0,
    production: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random point and a tangent vector of Frobenius norm in [0, max_norm] per matrix.

    Both are drawn in float64 and then rounded to ``dtype`` (None: drawn from :data:`DTYPES`).
    """
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    shape = draw(frame_shapes(production=production))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    x = random_stiefel(*shape, dtype=torch.float64, generator=generator)
    direction = project_tangent(x, torch.randn(shape, dtype=torch.float64, generator=generator))
    direction = direction / direction.norm(dim=(-2, -1), keepdim=True)  # nonzero: n, p != 1, 1
    norm = draw(st.floats(0.0, max_norm))
    return x.to(dtype), (norm * direction).to(dtype)
