"""Time and accuracy of every registered retraction on realistic batched PEFT shapes.

    python benchmarks/retractions.py            # CPU (and CUDA when present)
    python benchmarks/retractions.py --quick    # fewer repeats

Prints a markdown table and writes benchmarks/results/retractions.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, time_interleaved, write_json  # noqa: E402

from stiefel_peft.geometry import (
    RETRACTIONS,
    orthogonality_error,
    project_tangent,
    random_stiefel,
    retract,
)  # noqa: E402

SHAPE_SETS = {
    "TinyLlama-1.1B r=16 (q/k/v/o/gate-like)": (66, 2048, 16),
    "TinyLlama-1.1B r=16 (MLP)": (11, 5632, 16),
    "SmolLM2-135M r=32 (q, down)": (30, 576, 32),
    "SmolLM2-135M r=32 (k, v)": (30, 192, 32),
    "SmolLM2-135M r=32 (up)": (15, 1536, 32),
}


def run(device: str, repeats: int, step: float) -> list[dict[str, object]]:
    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    for label, shape in SHAPE_SETS.items():
        # Points are drawn in float64 so the fp64 column measures the retraction, not the
        # rounding of an fp32 starting point.
        x64 = random_stiefel(*shape, dtype=torch.float64, device=device, generator=generator)
        v64 = project_tangent(
            x64, torch.randn(shape, dtype=torch.float64, device=device, generator=generator)
        )
        v64 = step * v64 / v64.norm(dim=(-2, -1), keepdim=True)
        x, v = x64.float(), v64.float()
        functions = {
            name: (lambda name=name, x=x, v=v: retract(x, v, name)) for name in RETRACTIONS
        }
        seconds = time_interleaved(functions, device=device, repeats=repeats)
        for name in RETRACTIONS:
            rows.append(
                {
                    "shapes": label,
                    "batch_n_p": list(shape),
                    "device": device,
                    "retraction": name,
                    "ms": 1e3 * seconds[name],
                    "orthogonality_error_fp32": orthogonality_error(retract(x, v, name))
                    .max()
                    .item(),
                    "orthogonality_error_fp64": orthogonality_error(retract(x64, v64, name))
                    .max()
                    .item(),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5 repeats instead of 20")
    parser.add_argument(
        "--step",
        type=float,
        default=1e-2,
        help="Frobenius norm of each tangent step (default 1e-2)",
    )
    arguments = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    repeats = 5 if arguments.quick else 20
    rows = [row for device in devices for row in run(device, repeats, arguments.step)]
    table = markdown_table(
        ["shapes (batch x n x p)", "device", "retraction", "ms", "||y^T y - I|| fp32", "fp64"],
        [
            [
                f"{r['shapes']} {'x'.join(map(str, r['batch_n_p']))}",
                r["device"],
                r["retraction"],
                f"{r['ms']:.2f}",
                f"{r['orthogonality_error_fp32']:.1e}",
                f"{r['orthogonality_error_fp64']:.1e}",
            ]
            for r in rows
        ],
    )
    print(table)
    path = write_json(
        "retractions",
        {"environment": environment(devices[-1]), "step_norm": arguments.step, "rows": rows},
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
