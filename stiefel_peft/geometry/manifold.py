"""The Stiefel manifold as a :class:`geoopt.manifolds.Manifold`.

``geoopt.ManifoldParameter(x, manifold=Stiefel())`` then works with geoopt's own
``RiemannianAdam`` / ``RiemannianSGD`` and with :class:`stiefel_peft.optim.StiefelAdam`,
using this package's O(n p^2) maps instead of geoopt's canonical-metric default, whose
Cayley retraction solves n x n systems.
"""

from __future__ import annotations

import geoopt
import torch

from ._validation import broadcast_frames, check_frame, check_like, working_dtype
from .frames import orthogonality_error, orthonormalize, random_stiefel
from .projections import check_metric, inner, project_tangent, riemannian_gradient, sym
from .retractions import check_retraction, geodesic_canonical, retract, retract_exp
from .transports import transport

__all__ = ["Stiefel"]


class Stiefel(geoopt.manifolds.Manifold):
    r"""``St(n, p) = {x in R^{n x p} : x^T x = I_p}``, n >= p, batched over leading dims.

    Args:
        retraction: a name registered in :data:`stiefel_peft.geometry.RETRACTIONS`, used by
            ``retr`` (and so by geoopt's optimizers). Default ``"cayley"`` (exact, O(n p^2)).
        metric: ``"euclidean"`` (``<u, v> = tr(u^T v)``) or ``"canonical"``
            (``tr(u^T (I - x x^T / 2) v)``). It sets ``egrad2rgrad``, ``inner`` and ``expmap``.

    Every method broadcasts its arguments' leading dimensions as torch and geoopt do
    (``proju(x of shape (4, n, p), u of shape (n, p))`` is ``(4, n, p)``).

    One convention differs from geoopt's ``CanonicalStiefel``: ``proju`` is always the
    orthogonal projection of the embedding, ``u - x sym(x^T u)`` (the identity on tangent
    vectors), for both metrics. geoopt's canonical manifold uses ``u - x u^T x`` there, which
    is the canonical metric's gradient conversion (our ``egrad2rgrad`` with
    ``metric="canonical"``) and moves tangent vectors. The canonical metric enters here
    through ``egrad2rgrad``, ``inner`` and ``expmap``.

    Raises:
        ValueError: on an unknown retraction or metric.
    """

    name = "Stiefel"
    ndim = 2
    reversible = False

    def __init__(self, retraction: str = "cayley", metric: str = "euclidean") -> None:
        check_retraction(retraction)
        check_metric(metric)
        super().__init__()
        self.retraction = retraction
        self.metric = metric

    def extra_repr(self) -> str:
        return f"retraction={self.retraction!r}, metric={self.metric!r}"

    def _check_shape(self, shape: tuple[int, ...], name: str) -> tuple[bool, str | None]:
        ok, reason = super()._check_shape(shape, name)
        if not ok:
            return False, reason
        if shape[-1] > shape[-2]:
            return False, f"`{name}` needs shape[-1] <= shape[-2] (n >= p), got {tuple(shape)}"
        return True, None

    def _check_point_on_manifold(
        self, x: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        error = orthogonality_error(x)
        if bool((error > atol + rtol).any()):
            return False, f"`x^T x != I`: largest ||x^T x - I||_F = {error.max().item():.3g}"
        return True, None

    def _check_vector_on_tangent(
        self, x: torch.Tensor, u: torch.Tensor, *, atol: float = 1e-5, rtol: float = 1e-5
    ) -> tuple[bool, str | None]:
        dtype = working_dtype(x.dtype)
        symmetric = sym(x.to(dtype).mT @ u.to(dtype))
        error = torch.linalg.matrix_norm(2 * symmetric)
        if bool((error > atol + rtol).any()):
            return False, f"`x^T u + u^T x != 0`: largest norm {error.max().item():.3g}"
        return True, None

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The configured retraction ``R_x(u)``. Cost: O(n p^2)."""
        return retract(x, u, self.retraction)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The true geodesic of the configured metric (not a retraction). Cost: O(n p^2)."""
        if self.metric == "euclidean":
            return retract_exp(x, u)
        check_frame(x, "x")
        check_like(x, u, "u")
        dtype = working_dtype(x.dtype)
        return geodesic_canonical(*broadcast_frames(x.to(dtype), u.to(dtype))).to(x.dtype)

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Projection transport of ``v`` from ``T_x`` to ``T_y``. Cost: O(n p^2)."""
        return transport(x, y, v)

    def inner(
        self,
        x: torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor | None = None,
        *,
        keepdim: bool = False,
    ) -> torch.Tensor:
        """The metric, one value per matrix (``keepdim`` keeps the two matrix dims)."""
        value = inner(x, u, u if v is None else v, self.metric)
        return value[..., None, None] if keepdim else value

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Orthogonal (Euclidean) projection onto ``T_x``. Cost: O(n p^2)."""
        return project_tangent(x, u)

    def egrad2rgrad(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Riemannian gradient for the configured metric. Cost: O(n p^2)."""
        return riemannian_gradient(x, u, self.metric)

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest point on the manifold (polar factor). Cost: O(n p^2)."""
        return orthonormalize(x)

    def random(
        self,
        *size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> geoopt.ManifoldTensor:
        """A Haar-random point as a ``geoopt.ManifoldTensor`` on this manifold."""
        point = random_stiefel(*size, dtype=dtype, device=device, generator=generator)
        return geoopt.ManifoldTensor(point, manifold=self)

    def origin(
        self,
        *size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        seed: int | None = 42,
    ) -> geoopt.ManifoldTensor:
        """The first ``p`` columns of the identity, broadcast to ``size``."""
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        self._assert_check_shape(shape, "x")
        eye = torch.zeros(shape, dtype=dtype, device=device)
        eye[..., range(shape[-1]), range(shape[-1])] = 1
        return geoopt.ManifoldTensor(eye, manifold=self)
