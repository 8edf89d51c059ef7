"""Top-eigenspace search with StiefelAdam: maximise tr(X^T A X) over X^T X = I.

The maximum is the sum of the p largest eigenvalues of the symmetric A, reached by any
orthonormal basis of their eigenspace (the Brockett / Rayleigh-quotient problem). The script
prints the gap to that optimum, the subspace distance to torch.linalg.eigh's answer and the
orthogonality error ||X^T X - I||_F while it trains.

    python examples/stiefel_adam.py [--n 200] [--p 8] [--steps 1500] [--retraction cayley]
    python examples/stiefel_adam.py --fast     # a few hundred steps on a small problem
"""

from __future__ import annotations

import argparse

import torch

from stiefel_peft.geometry import RETRACTIONS, orthogonality_error, random_stiefel
from stiefel_peft.optim import StiefelAdam


def random_symmetric(n: int, p: int, generator: torch.Generator) -> torch.Tensor:
    """Symmetric n x n: n - p eigenvalues in [0, 1], the top p raised by 1..p (an eigengap)."""
    basis = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
    values = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    values[-p:] += torch.arange(1, p + 1, dtype=torch.float64)
    return (basis * values) @ basis.T


def run(n: int, p: int, steps: int, lr: float, retraction: str, seed: int = 0) -> dict[str, float]:
    """Train and return the final optimality gap, subspace distance and orthogonality error."""
    generator = torch.Generator().manual_seed(seed)
    matrix = random_symmetric(n, p, generator)
    top = torch.linalg.eigh(matrix).eigenvectors[:, -p:]  # (n, p)
    best = torch.linalg.eigvalsh(matrix)[-p:].sum().item()
    frame = torch.nn.Parameter(random_stiefel(n, p, dtype=torch.float64, generator=generator))
    optimizer = StiefelAdam([frame], lr=lr, retraction=retraction)
    # Adam's steps keep a length of about lr, so decay it to converge (any torch scheduler works)
    decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.01 ** (1.0 / steps))
    report_every = max(steps // 5, 1)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = -torch.trace(frame.T @ matrix @ frame)
        loss.backward()
        optimizer.step()
        decay.step()
        if step % report_every == 0 or step == steps:
            with torch.no_grad():
                gap = best + loss.item()
                distance = torch.linalg.matrix_norm(frame @ frame.T - top @ top.T).item()
                error = orthogonality_error(frame).item()
            print(
                f"step {step:5d}  objective {-loss.item():12.6f}  gap {gap:10.3e}  "
                f"subspace distance {distance:9.2e}  ||X^T X - I|| {error:9.2e}"
            )
    return {"gap": gap, "distance": distance, "orthogonality_error": error}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--p", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--retraction", choices=sorted(RETRACTIONS), default="cayley")
    parser.add_argument("--fast", action="store_true", help="n=30, p=3, 300 steps")
    args = parser.parse_args(argv)
    if args.fast:
        args.n, args.p, args.steps = 30, 3, 300
    print(f"top-{args.p} eigenspace of a {args.n} x {args.n} matrix, retraction {args.retraction}")
    return run(args.n, args.p, args.steps, args.lr, args.retraction)


if __name__ == "__main__":
    main()
