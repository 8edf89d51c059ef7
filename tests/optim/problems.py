"""Small optimization problems on the Stiefel manifold with known solutions."""

from __future__ import annotations

import torch

from stiefel_peft.geometry import random_stiefel


def brockett(n: int, p: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, top, x0)``: symmetric ``a`` with a unit eigengap below its top-p eigenspace.

    Maximising ``tr(x^T a x)`` on St(n, p) gives that eigenspace; ``top`` is its basis from
    ``torch.linalg.eigh``; ``x0`` a random start. All float64.
    """
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
    values = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    values[-p:] += torch.arange(1, p + 1, dtype=torch.float64)
    a = (basis * values) @ basis.T
    top = torch.linalg.eigh(a).eigenvectors[:, -p:]
    return a, top, random_stiefel(n, p, dtype=torch.float64, generator=generator)


def subspace_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """``||x x^T - y y^T||_F``: zero iff the column spaces agree. Forms n x n (tests only)."""
    return torch.linalg.matrix_norm(x @ x.T - y @ y.T).item()


def train_brockett(optimizer_factory, steps: int, gamma: float, n: int = 20, p: int = 3) -> float:
    """Run ``steps`` steps with exponential lr decay; return the subspace distance to eigh's."""
    a, top, x0 = brockett(n, p)
    x = torch.nn.Parameter(x0.clone())
    optimizer = optimizer_factory([x])
    # (a scheduler needs a torch Optimizer; schedule a wrapper's inner optimizer instead)
    schedule = None if gamma == 1.0 else torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma)
    for _ in range(steps):
        x.grad = -2.0 * a @ x.detach()  # gradient of -tr(x^T a x)
        optimizer.step()
        if schedule is not None:
            schedule.step()
    return subspace_distance(x.detach(), top)
