"""FoRAReport: what apply_fora chose and why, saved as JSON next to the adapter."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the report imports nothing of the FoRA pipeline
    from stiefel_peft.fisher import FisherScores
    from stiefel_peft.fora.config import FoRAConfig
    from stiefel_peft.fora.plan import FoRAPlan

__all__ = ["REPORT_FILE", "FoRAReport"]

REPORT_FILE = "fora_report.json"


@dataclass
class FoRAReport:
    """The outcome of :func:`stiefel_peft.apply_fora`, reachable as ``model.fora_report``.

    Attributes:
        budget: the fraction of blocks asked for.
        num_blocks: L, the blocks of the model.
        selected_blocks: the K adapted block indices, ascending.
        per_block_scores: block index -> Fisher score (None when nothing was scored, i.e.
            budget 1).
        estimator: the Fisher estimator used (None when nothing was scored).
        data_free: True when no calibration data was given and the data-free fallback ranked
            the blocks.
        target_modules: the patterns in use (relative to a block).
        adapted_modules: the exact module names that carry an adapter.
        stiefel_factor, retraction, r, lora_alpha: as in the config.
        adapter_parameters: parameters of the LoRA factors that were added.
        lora_equivalent_parameters: those of LoRA with the same r and targets on every block.
        parameter_ratio: ``adapter_parameters / lora_equivalent_parameters`` (<= budget).
        scoring_seconds: time spent on the Fisher pass.
        calibration_examples: examples scored.
        init: the initialisation (``FoRAConfig.init``).
        extra: anything else worth keeping (the adapter name, the initialisation's info,
            the command line's accuracies and timings).
    """

    budget: float
    num_blocks: int
    selected_blocks: list[int]
    per_block_scores: dict[int, float] | None
    estimator: str | None
    data_free: bool
    target_modules: list[str]
    adapted_modules: list[str]
    stiefel_factor: str
    retraction: str
    r: int
    lora_alpha: float
    adapter_parameters: int
    lora_equivalent_parameters: int
    parameter_ratio: float
    scoring_seconds: float
    calibration_examples: int
    init: str = "orthonormal"
    extra: dict[str, Any] = field(default_factory=dict)
    selection: str = "top_blocks"
    ranks: dict[str, int] | None = None

    @classmethod
    def from_plan(
        cls,
        plan: FoRAPlan,
        config: FoRAConfig,
        scores: FisherScores | None,
        data_free: bool,
        scoring_seconds: float,
        extra: dict[str, Any] | None = None,
    ) -> FoRAReport:
        """The report of an adapter injected by ``plan`` with ``config`` (and the scores that
        chose its blocks, or None when nothing was scored)."""
        adapter_parameters = plan.parameters(config.r)
        equivalent = plan.lora_equivalent(config.r)
        return cls(
            budget=config.budget,
            num_blocks=plan.blocks.length,
            selected_blocks=list(plan.selected_blocks),
            per_block_scores=dict(scores.per_block) if scores is not None else None,
            estimator=("sampled" if data_free else scores.estimator) if scores else None,
            data_free=data_free,
            target_modules=list(plan.patterns),
            adapted_modules=list(plan.adapted_modules),
            stiefel_factor=config.stiefel_factor,
            retraction=config.retraction,
            r=config.r,
            lora_alpha=config.lora_alpha,
            adapter_parameters=adapter_parameters,
            lora_equivalent_parameters=equivalent,
            parameter_ratio=adapter_parameters / equivalent,
            scoring_seconds=scoring_seconds,
            calibration_examples=scores.num_examples if scores is not None else 0,
            init=config.init,
            extra=dict(extra or {}),
            selection=config.selection,
            ranks=dict(plan.ranks) or None,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.per_block_scores is not None:
            data["per_block_scores"] = {str(k): v for k, v in self.per_block_scores.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FoRAReport:
        data = dict(data)
        if data.get("per_block_scores") is not None:
            data["per_block_scores"] = {
                int(k): float(v) for k, v in data["per_block_scores"].items()
            }
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON; a directory gets ``fora_report.json`` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> FoRAReport:
        """Read a report written by :meth:`save` (a file, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_FILE
        return cls.from_dict(json.loads(path.read_text()))

    def summary(self) -> str:
        """A short human-readable table of the per-block scores and the selection."""
        lines = [
            f"FoRA: {len(self.selected_blocks)}/{self.num_blocks} blocks, r={self.r}, "
            f"{self.adapter_parameters:,} adapter parameters "
            f"({self.parameter_ratio:.2f}x LoRA on every block), estimator={self.estimator}"
            + (" (data-free)" if self.data_free else "")
        ]
        if self.per_block_scores:
            top = max(self.per_block_scores.values()) or 1.0
            for index in range(self.num_blocks):
                score = self.per_block_scores.get(index, 0.0)
                mark = "*" if index in self.selected_blocks else " "
                bar = "#" * round(20 * score / top) if top > 0 else ""
                lines.append(f"  {mark} block {index:3d}  {score:11.4g}  {bar}")
        else:
            lines.append(f"  selected blocks: {self.selected_blocks}")
        return "\n".join(lines)
