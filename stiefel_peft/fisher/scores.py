"""The result of a Fisher estimate: per-module and per-block scores, with a JSON round trip."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FisherScores"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FisherScores:
    """Scores of one estimator on one calibration set.

    The dataclass is frozen (its fields cannot be reassigned); treat the dicts as read-only.

    Attributes:
        estimator: the estimator's name, e.g. ``"empirical"``.
        per_module: module name (exactly as ``model.named_modules()`` yields it) -> score.
        per_block: block index -> sum of the scores of its modules (modules outside the blocks
            are in ``per_module`` only).
        num_examples: examples that entered the estimate.
        num_batches: batches read.
        seconds: wall-clock time of the estimate.
        blocks_path: dotted name of the block ``nn.ModuleList`` (None if the model has none).
        num_samples: label samples per example (``"sampled"`` only; 1 otherwise).
        seed: the seed of the label sampler.
    """

    estimator: str
    per_module: dict[str, float]
    per_block: dict[int, float]
    num_examples: int
    num_batches: int
    seconds: float
    blocks_path: str | None = None
    num_samples: int = 1
    seed: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def block_ranking(self) -> list[int]:
        """Block indices sorted by score, highest first (ties: lower index first)."""
        return sorted(self.per_block, key=lambda index: (-self.per_block[index], index))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (block indices become string keys)."""
        return {
            "format_version": FORMAT_VERSION,
            "estimator": self.estimator,
            "per_module": dict(self.per_module),
            "per_block": {str(index): score for index, score in self.per_block.items()},
            "num_examples": self.num_examples,
            "num_batches": self.num_batches,
            "seconds": self.seconds,
            "blocks_path": self.blocks_path,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FisherScores:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: on a missing key or an unknown ``format_version``.
        """
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"unknown FisherScores format_version {version}; expected 1")
        try:
            return cls(
                estimator=data["estimator"],
                per_module={str(k): float(v) for k, v in data["per_module"].items()},
                per_block={int(k): float(v) for k, v in data["per_block"].items()},
                num_examples=int(data["num_examples"]),
                num_batches=int(data["num_batches"]),
                seconds=float(data["seconds"]),
                blocks_path=data.get("blocks_path"),
                num_samples=int(data.get("num_samples", 1)),
                seed=int(data.get("seed", 0)),
                metadata=dict(data.get("metadata", {})),
            )
        except KeyError as error:
            raise ValueError(f"FisherScores data lacks the key {error}") from None

    def to_json(self) -> str:
        """JSON text; ``FisherScores.from_json(s.to_json()) == s`` (floats are exact in JSON)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FisherScores:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> FisherScores:
        """Read a file written by :meth:`save`."""
        return cls.from_json(Path(path).read_text())
