"""Optimizer step time: StiefelAdam (each retraction) vs torch AdamW (foreach) vs geoopt.

Same factors, same process, interleaved runs (round-robin over the optimizers, so drift in
machine load hits all of them), median over runs. Shape sets: the SmolLM2-135M FoRA B-factors
(75 factors, always); on CUDA also TinyLlama-1.1B (r = 16) and Llama-3.1-8B (r = 32, 16 blocks).
Prints a table and writes ``benchmarks/results/optimizer_step.json`` with environment info.

    python benchmarks/optimizer_step.py [--repeats 30] [--steps 10] [--runs 5] [--threads 1]

With ``--runs N`` the whole interleaved measurement is repeated N times (fresh optimizers each
time) and the table gives the median of the per-run medians and ratios with their range: on a
shared machine one run's ratio to geoopt alone moves by a third.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import geoopt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from stiefel_peft.geometry import RETRACTIONS, random_stiefel  # noqa: E402
from stiefel_peft.optim import StiefelAdam  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "optimizer_step.json"


def smollm2_factors() -> list[tuple[int, int]]:
    # 15 blocks x q(576), k(192), v(192), up(1536), down(576), r = 32
    return [(rows, 32) for _ in range(15) for rows in (576, 192, 192, 1536, 576)]


def tinyllama_factors() -> list[tuple[int, int]]:
    return [(2048, 16)] * 66 + [(5632, 16)] * 11


def llama8b_factors() -> list[tuple[int, int]]:
    return [(rows, 32) for _ in range(16) for rows in (4096, 1024, 1024, 14336, 4096)]


def optimizer_kinds() -> list[str]:
    """AdamW, geoopt, then StiefelAdam with each registered retraction (``stiefel-<name>``)."""
    return ["adamw", "geoopt", *(f"stiefel-{name}" for name in sorted(RETRACTIONS))]


def make_parameters(shapes: list[tuple[int, int]], device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    points = [random_stiefel(n, p, generator=generator) for n, p in shapes]
    grads = [torch.randn(n, p, generator=generator) * 1e-2 for n, p in shapes]
    return [point.to(device) for point in points], [grad.to(device) for grad in grads]


def build(kind: str, points, grads):
    if kind == "geoopt":
        manifold = geoopt.EuclideanStiefel()
        params = [geoopt.ManifoldParameter(p.clone(), manifold=manifold) for p in points]
        optimizer = geoopt.optim.RiemannianAdam(params, lr=1e-3, stabilize=None)
    else:
        params = [torch.nn.Parameter(p.clone()) for p in points]
        if kind == "adamw":
            optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True)
        else:
            optimizer = StiefelAdam(params, lr=1e-3, retraction=kind.removeprefix("stiefel-"))
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.clone()
    return optimizer


def timer(device: torch.device) -> Callable[[], float]:
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def measure(shapes, device, repeats: int, steps: int, kinds: list[str]) -> dict[str, float]:
    points, grads = make_parameters(shapes, device)
    optimizers = {kind: build(kind, points, grads) for kind in kinds}
    now = timer(device)
    for optimizer in optimizers.values():  # warm-up: state, buckets, first-step checks
        for _ in range(3):
            optimizer.step()
    samples: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(repeats):
        for kind, optimizer in optimizers.items():
            start = now()
            for _ in range(steps):
                optimizer.step()
            samples[kind].append((now() - start) / steps * 1e3)
    return {kind: statistics.median(values) for kind, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 repeats of 2 steps (smoke test)")
    parser.add_argument("--runs", type=int, default=1, help="independent runs (median, range)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats, steps = (3, 2) if args.quick else (args.repeats, args.steps)
    kinds = optimizer_kinds()
    cases = [("smollm2-135m fora B (75)", smollm2_factors(), torch.device("cpu"))]
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        cases += [
            ("smollm2-135m fora B (75)", smollm2_factors(), cuda),
            ("tinyllama-1.1b r16 (77)", tinyllama_factors(), cuda),
            ("llama-3.1-8b r32 16 blocks (80)", llama8b_factors(), cuda),
        ]
    rows = []
    for name, shapes, device in cases:
        runs = [measure(shapes, device, repeats, steps, kinds) for _ in range(max(1, args.runs))]
        for kind in kinds:
            times = [run[kind] for run in runs]
            to_adamw = [run[kind] / run["adamw"] for run in runs]
            to_geoopt = [run[kind] / run["geoopt"] for run in runs]
            rows.append(
                {
                    "set": name,
                    "device": device.type,
                    "optimizer": kind,
                    "median_ms": statistics.median(times),
                    "ratio_vs_adamw": statistics.median(to_adamw),
                    "ratio_vs_geoopt": statistics.median(to_geoopt),
                    "runs": len(runs),
                    "range_ms": [min(times), max(times)],
                    "range_vs_adamw": [min(to_adamw), max(to_adamw)],
                    "range_vs_geoopt": [min(to_geoopt), max(to_geoopt)],
                }
            )
    print(
        f"{'set':34} {'device':6} {'optimizer':28} {'ms':>9} {'/AdamW':>7} {'(range)':>13} "
        f"{'/geoopt':>8} {'(range)':>13}"
    )
    for row in rows:
        low_a, high_a = row["range_vs_adamw"]
        low_g, high_g = row["range_vs_geoopt"]
        print(
            f"{row['set']:34} {row['device']:6} {row['optimizer']:28} {row['median_ms']:9.3f} "
            f"{row['ratio_vs_adamw']:7.2f} [{low_a:5.2f},{high_a:5.2f}] "
            f"{row['ratio_vs_geoopt']:8.2f} [{low_g:5.2f},{high_g:5.2f}]"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": environment(extra={"geoopt": geoopt.__version__}),
        "repeats": repeats,
        "steps": steps,
        "rows": rows,
    }
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
