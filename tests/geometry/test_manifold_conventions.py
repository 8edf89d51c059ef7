"""The manifold behaves as geoopt's own manifolds do, for every retraction and both metrics.

The checks of geoopt's manifold suite (tests/test_manifold_basic.py: projection identities,
broadcasting of projx/proju/retr/transp over a stacked batch, expmap/logmap), restated for
:class:`~stiefel_peft.geometry.Stiefel` with unit-scale tangent steps, the size at which the
approximate retractions once left the manifold. One convention differs and is pinned here:
``proju`` is the Euclidean projection for both metrics (geoopt's canonical manifold projects
with ``u - x u^T x``).
"""

from __future__ import annotations

import pytest
import torch

from stiefel_peft.geometry import RETRACTIONS, Stiefel

SHAPE = (10, 5)
CASES = [
    pytest.param(metric, retraction, id=f"{metric}-{retraction}")
    for metric in ("euclidean", "canonical")
    for retraction in sorted(RETRACTIONS)
]


def _case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An ambient matrix, its polar factor ``x``, an ambient ``e`` and its projection ``v``."""
    generator = torch.Generator().manual_seed(seed)
    ambient = torch.randn(*SHAPE, dtype=torch.float64, generator=generator)
    e = torch.randn(*SHAPE, dtype=torch.float64, generator=generator)
    u, _, vh = torch.linalg.svd(ambient, full_matrices=False)
    x = u @ vh
    product = x.mT @ e
    return ambient, x, e, e - x @ (product + product.mT) / 2


@pytest.mark.parametrize(("metric", "retraction"), CASES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_projections_points_and_tangents(metric: str, retraction: str, seed: int) -> None:
    manifold = Stiefel(retraction=retraction, metric=metric)
    ambient, x, e, v = _case(seed)
    torch.testing.assert_close(manifold.projx(x), x, atol=1e-6, rtol=0)
    projected = manifold.projx(ambient)
    manifold.assert_check_point_on_manifold(projected)
    torch.testing.assert_close(projected, x, atol=1e-6, rtol=0)
    tangent = manifold.proju(x, e)
    manifold.assert_check_vector_on_tangent(x, tangent)
    torch.testing.assert_close(tangent, v, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("metric", "retraction"), CASES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stacked_batches_broadcast_like_one_by_one(metric: str, retraction: str, seed: int):
    manifold = Stiefel(retraction=retraction, metric=metric)
    ambient, x, _, v = _case(seed)
    points = torch.stack([x] * 4)
    steps = manifold.proju(points, torch.stack([v] * 4))  # unit-scale tangent steps
    moved = manifold.retr(points, steps)
    manifold.assert_check_point_on_manifold(moved)
    others = manifold.proju(points, torch.randn(4, *SHAPE, dtype=torch.float64))
    carried = manifold.transp_follow_retr(points, steps, others)
    manifold.assert_check_vector_on_tangent(moved, carried)
    stacked = manifold.projx(torch.stack([ambient] * 4))
    for i in range(4):
        manifold.assert_check_point_on_manifold(moved[i])
        torch.testing.assert_close(moved[i], manifold.retr(x, steps[i]), atol=1e-5, rtol=0)
        single = manifold.transp_follow_retr(x, steps[i], others[i])
        torch.testing.assert_close(carried[i], single, atol=1e-5, rtol=0)
        torch.testing.assert_close(stacked[i], manifold.projx(ambient), atol=1e-7, rtol=0)
    # an (n, p) argument against a (4, n, p) one: broadcast, as torch and geoopt do
    broadcast = manifold.proju(points, v)
    torch.testing.assert_close(broadcast, torch.stack([manifold.proju(x, v)] * 4))
    expanded = manifold.expmap(points, v)
    torch.testing.assert_close(expanded, torch.stack([manifold.expmap(x, v)] * 4))
    with pytest.raises(NotImplementedError):  # no closed-form logarithm: geoopt skips it
        manifold.logmap(points, expanded)


def test_canonical_proju_is_the_euclidean_projection() -> None:
    _, x, e, v = _case(4)
    euclidean, canonical = Stiefel(metric="euclidean"), Stiefel(metric="canonical")
    torch.testing.assert_close(canonical.proju(x, e), euclidean.proju(x, e), atol=0, rtol=0)
    geoopt_style = e - x @ e.mT @ x  # geoopt's CanonicalStiefel.proju: another tangent vector
    canonical.assert_check_vector_on_tangent(x, geoopt_style)
    # ours is a projection (the identity on tangent vectors); geoopt's canonical one is its
    # canonical-metric gradient conversion, which is what our egrad2rgrad returns
    torch.testing.assert_close(canonical.proju(x, v), v, atol=1e-12, rtol=0)
    torch.testing.assert_close(canonical.egrad2rgrad(x, e), geoopt_style, atol=1e-12, rtol=0)
