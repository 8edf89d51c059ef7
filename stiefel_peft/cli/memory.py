"""The peak memory of each phase of a run (load, score, train, ...), for the run's report.

On Linux the resident-set high-water mark of the process (``VmHWM``) is reset at the start of
each phase (``/proc/self/clear_refs``) and read at its end, so each phase reports its own peak
without a sampling thread; freed heap memory is handed back to the system between phases
(``malloc_trim``), so one phase's leftovers do not count against the next. On CUDA the peak of
``torch.cuda.max_memory_allocated`` is recorded too. Elsewhere the process-wide peak since the
start is reported (``getrusage``), marked as such.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["PhaseMemory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_mb(field: str) -> float | None:
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def _trim_heap() -> None:
    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to hand back
        ctypes.CDLL(name).malloc_trim(0)


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


class PhaseMemory:
    """Records the peak memory (MB) of named phases.

    Attributes:
        peaks: ``{phase: peak resident set size in MB}``.
        cuda_peaks: ``{phase: peak CUDA memory allocated by torch in MB}`` (CUDA only).
        per_phase: False where the peak could not be reset (then each value is the process
            peak since its start).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks: dict[str, float] = {}
        self.cuda_peaks: dict[str, float] = {}
        self.per_phase = True

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        _trim_heap()
        self.per_phase = _reset_peak() and self.per_phase
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            peak = _status_mb("VmHWM") if self.per_phase else None
            if peak is None:
                self.per_phase = False
                scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes vs kB
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
            self.peaks[name] = round(peak, 1)
            if cuda:
                self.cuda_peaks[name] = round(
                    torch.cuda.max_memory_allocated(self.device) / 2**20, 1
                )

    def to_dict(self) -> dict[str, object]:
        return {
            "peak_rss_mb": dict(self.peaks),
            "peak_cuda_allocated_mb": dict(self.cuda_peaks) or None,
            "per_phase": self.per_phase,
            "overall_peak_rss_mb": max(self.peaks.values(), default=None),
        }

    def summary(self) -> str:
        """One line: ``peak memory (RSS): load 520 MB, score 1.3 GB, ...``."""
        parts = [f"{name} {_human(mb)}" for name, mb in self.peaks.items()]
        scope = "" if self.per_phase else " (process peak so far)"
        return f"peak memory{scope}: " + ", ".join(parts)


def _human(mb: float) -> str:
    return f"{mb / 1024:.2f} GB" if mb >= 1024 else f"{mb:.0f} MB"
