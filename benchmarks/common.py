"""Shared helpers for the benchmark scripts: environment info, interleaved timing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(
    device: torch.device | str = "cpu", extra: dict[str, object] | None = None
) -> dict[str, object]:
    """What the numbers were measured on, plus ``extra`` (e.g. versions of compared libraries)."""
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    info.update(extra or {})
    return info


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    functions: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    repeats: int = 20,
    warmup: int = 3,
    before_round: Callable[[int], object] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin so that machine noise
    falls on all of them alike.

    ``before_round(i)`` (optional) runs untimed before round ``i`` of the timed rounds, e.g. to
    swap in the i-th input set (a new random batch or gradient) shared by every function.
    """
    for _ in range(warmup):
        for function in functions.values():
            function()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(repeats):
        if before_round is not None:
            before_round(round_index)
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def write_json(name: str, payload: dict[str, object]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def peak_bytes(function: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak memory that one call of ``function`` allocates above what was held before it.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the tensor-allocator
    timeline of one profiled call (``torch.profiler`` with ``profile_memory=True``), whose
    running maximum is the peak above the memory held before the call. Python objects and
    allocator caching are not counted; the same rule applies to every method compared.
    """
    from torch.profiler import ProfilerActivity, profile

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        function()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    timeline = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in profiler.events()
        if event.self_cpu_memory_usage
    )
    current = peak = 0
    for _, delta in timeline:
        current += delta
        peak = max(peak, current)
    return peak
