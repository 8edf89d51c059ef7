"""``stiefel-peft retractions``: measure every registered retraction, yours included.

For each retraction of :data:`stiefel_peft.geometry.RETRACTIONS` (after importing the modules
named by ``--import``, which register theirs with ``register_retraction``) and each frame shape:

- the time of one call on a batch of frames (median of interleaved rounds),
- the orthogonality error ``max ||y^T y - I||_F`` after one step and after ``--steps`` steps
  in a row (random tangent directions, no re-orthonormalisation in between),
- the order of accuracy: the slope ``s`` of ``log ||R_x(t v) - Exp_x(t v)||`` against
  ``log t`` for ``t`` from 1e-1 to 1e-3 (float64, ``Exp`` the embedded-metric geodesic
  :func:`~stiefel_peft.geometry.retract_exp`), reported as ``s - 1``: every retraction is at
  least first order; second order means it agrees with the geodesic to ``O(t^3)``.

Prints a table and writes ``<output>/retractions.json``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from stiefel_peft.cli.options import UsageError, positive_int, prepare_output, resolve_output
from stiefel_peft.geometry import (
    RETRACTIONS,
    orthogonality_error,
    project_tangent,
    random_stiefel,
    retract,
    retract_exp,
)

__all__ = ["RetractionSettings", "add_parser", "measure", "parse_shapes", "run"]

DEFAULT_SHAPES = "15x576x32,15x192x32,15x1536x32"  # SmolLM2-135M FoRA factors, r = 32


@dataclass
class RetractionSettings:
    """``stiefel-peft retractions``.

    Attributes:
        imports: modules (names or ``.py`` files) imported first; they register retractions.
        shapes: frame shapes ``batch x n x p`` (or ``n x p``), comma-separated.
        steps: steps in a row for the long-run orthogonality error.
        step_size: Frobenius norm of each tangent step.
        repeats: timed rounds per retraction.
        dtype: ``float32`` or ``float64`` for the timing and drift columns.
        output: the output folder (``retractions.json``).
    """

    imports: list[str] = field(default_factory=list)
    shapes: str = DEFAULT_SHAPES
    steps: int = 1000
    step_size: float = 0.1
    repeats: int = 10
    dtype: str = "float32"
    output: str | None = None


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"15x576x32,576x32"`` -> ``[(15, 576, 32), (1, 576, 32)]``.

    Raises:
        ValueError: a shape that is not two or three positive integers with ``p <= n``.
    """
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        try:
            numbers = [int(part) for part in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3) or min(numbers, default=0) < 1:
            raise ValueError(f"--shapes entry {item!r} must be BATCHxNxP or NxP, e.g. 15x576x32")
        batch, n, p = numbers if len(numbers) == 3 else [1, *numbers]
        if p > n:
            raise ValueError(f"--shapes entry {item!r}: p = {p} is larger than n = {n}")
        shapes.append((batch, n, p))
    return shapes


def import_plugins(names: list[str]) -> None:
    """Import each module name or ``.py`` file (which registers its retractions).

    Raises:
        UsageError: a module that cannot be found or raises on import (first line).
    """
    for name in names:
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise ImportError(f"no such file {name!r}")
                spec = importlib.util.spec_from_file_location(path.stem, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
            else:
                if "" not in sys.path:
                    sys.path.insert(0, "")  # the current folder, as `python -m` does
                importlib.import_module(name)
        except Exception as error:  # any failure of the user's module is reported in one line
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(f"--import {name!r} failed: {first}") from None


def _time(functions: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    for function in functions.values():
        function()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _tangent(x: torch.Tensor, size: float, generator: torch.Generator) -> torch.Tensor:
    v = project_tangent(x, torch.randn(x.shape, dtype=x.dtype, generator=generator))
    return size * v / v.norm(dim=(-2, -1), keepdim=True)


def order_of_accuracy(name: str, n: int, p: int, seed: int = 0) -> float | None:
    """``slope - 1`` of the distance to the geodesic (see the module text); None when the
    retraction is the geodesic to rounding (``exp``)."""
    generator = torch.Generator().manual_seed(seed)
    x = random_stiefel(n, p, dtype=torch.float64, generator=generator)
    v = _tangent(x, 1.0, generator)
    sizes = [10 ** (-1 - 0.5 * i) for i in range(5)]  # 1e-1 ... 1e-3
    errors = [float((retract(x, t * v, name) - retract_exp(x, t * v)).norm()) for t in sizes]
    if max(errors) < 1e-12:
        return None
    logs = [(math.log(t), math.log(max(e, 1e-300))) for t, e in zip(sizes, errors, strict=True)]
    mean_t = sum(a for a, _ in logs) / len(logs)
    mean_e = sum(b for _, b in logs) / len(logs)
    slope = sum((a - mean_t) * (b - mean_e) for a, b in logs) / sum(
        (a - mean_t) ** 2 for a, _ in logs
    )
    return slope - 1


def measure(settings: RetractionSettings) -> list[dict[str, Any]]:
    """One row per (shape, retraction): ms, errors after 1 and after ``steps`` steps, order."""
    dtype = getattr(torch, settings.dtype)
    rows = []
    for batch, n, p in parse_shapes(settings.shapes):
        generator = torch.Generator().manual_seed(0)
        x = random_stiefel(batch, n, p, dtype=dtype, generator=generator)
        v = _tangent(x, settings.step_size, generator)
        names = sorted(RETRACTIONS)
        calls = {name: lambda name=name, x=x, v=v: retract(x, v, name) for name in names}
        seconds = _time(calls, settings.repeats)
        for name in names:
            drift = torch.Generator().manual_seed(1)
            y = x
            for _ in range(settings.steps):
                y = retract(y, _tangent(y, settings.step_size, drift), name)
            rows.append(
                {
                    "shape": [batch, n, p],
                    "retraction": name,
                    "ms": 1e3 * seconds[name],
                    "error_one_step": float(orthogonality_error(retract(x, v, name)).max()),
                    "error_after_steps": float(orthogonality_error(y).max()),
                    "steps": settings.steps,
                    "order": order_of_accuracy(name, n, p),
                }
            )
    return rows


def _table(rows: list[dict[str, Any]], steps: int) -> str:
    header = f"| shape | retraction | ms | error, 1 step | error, {steps} steps | order |"
    lines = [header, "|---|---|---|---|---|---|"]
    for row in rows:
        order = "geodesic" if row["order"] is None else f"{row['order']:.2f}"
        lines.append(
            f"| {'x'.join(map(str, row['shape']))} | {row['retraction']} | {row['ms']:.3f} | "
            f"{row['error_one_step']:.1e} | {row['error_after_steps']:.1e} | {order} |"
        )
    return "\n".join(lines)


def run(settings: RetractionSettings) -> list[dict[str, Any]]:
    """Import the plugins, measure, print the table, write ``retractions.json``."""
    import_plugins(settings.imports)
    rows = measure(settings)
    print(_table(rows, settings.steps))
    output = Path(settings.output) if settings.output else Path(".")
    payload = {
        "settings": asdict(settings),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    path = output / "retractions.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"saved to {path}")
    return rows


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """The ``retractions`` subcommand's options."""
    defaults = RetractionSettings()
    parser = commands.add_parser(
        "retractions",
        help="time every registered retraction (yours with --import) and measure its accuracy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="a module name or .py file to import first (it registers retractions); repeatable",
    )  # fmt: skip
    parser.add_argument("--shapes", default=defaults.shapes, help="BATCHxNxP[,...]")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps,
                        help="steps in a row for the long-run error")  # fmt: skip
    parser.add_argument("--step-size", type=float, default=defaults.step_size,
                        help="Frobenius norm of each tangent step")  # fmt: skip
    parser.add_argument("--repeats", type=positive_int, default=defaults.repeats,
                        help="timed rounds")  # fmt: skip
    parser.add_argument("--dtype", choices=("float32", "float64"), default=defaults.dtype)
    parser.add_argument("--output", default=None,
                        help="output folder (default: runs/retractions-<date>-<time>)")  # fmt: skip
    return parser


def settings_from(arguments: argparse.Namespace) -> RetractionSettings:
    """The settings of parsed options; checks the shapes and prepares the output folder.

    Raises:
        UsageError: bad shapes, a non-positive step size, or an unusable output folder.
    """
    settings = RetractionSettings(
        imports=list(arguments.imports), shapes=arguments.shapes, steps=arguments.steps,
        step_size=arguments.step_size, repeats=arguments.repeats, dtype=arguments.dtype,
        output=arguments.output,
    )  # fmt: skip
    try:
        parse_shapes(settings.shapes)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not settings.step_size > 0:
        raise UsageError(f"--step-size must be positive, got {settings.step_size}")
    output = resolve_output(settings.output, "retractions")
    settings.output = str(prepare_output(output))
    return settings
