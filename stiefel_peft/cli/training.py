"""The application's data order and schedule: length-grouped batches, calibration, warm-up.

Used by ``stiefel-peft finetune`` and by the quality study (``experiments/``) alike, through
:func:`stiefel_peft.cli.trainer.fit`, so that every number in ``docs/results.md`` comes from
the loop the command line runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from stiefel_peft.cli.encoding import ExampleCollator

__all__ = [
    "WARMUP",
    "LengthGroupedBatches",
    "calibration_batches",
    "length_grouped_order",
    "schedule",
    "split_by_tokens",
    "warmup_steps",
]


def _length(example: dict[str, Any]) -> int:
    return (
        len(str(example.get("text", "")))
        + len(str(example.get("prompt", "")))
        + len(str(example.get("completion", "")))
    )


def length_grouped_order(
    examples: Sequence[dict[str, Any]], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """Batches of indices for one epoch: a seeded shuffle, then within windows of 8 batches the
    examples are sorted by length (less padding: reviews are 36 tokens on average but a random
    batch pads to ~60), and the batches are shuffled again so lengths do not trend over time.
    The last window's last batch may be short."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    window = 8 * batch_size
    groups: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: _length(examples[i]))
        groups.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    permutation = torch.randperm(len(groups), generator=generator).tolist()
    return [groups[i] for i in permutation]


class LengthGroupedBatches(torch.utils.data.Sampler[list[int]]):
    """The batch sampler of the training data: :func:`length_grouped_order` batches of
    ``batch_size`` examples (one optimizer step), each cut into ``batch_size // chunk_size``
    consecutive chunks of ``chunk_size`` (one forward pass of all processes together).

    Epoch ``e``'s order is the ``e``-th draw of one generator seeded with ``seed`` (set by
    :meth:`set_epoch`, which ``transformers.Trainer`` calls), so a resumed run sees the same
    order. An epoch's short last batch is dropped: every step sees ``batch_size`` examples.

    Attributes:
        batch_size: ``chunk_size``, what one iteration yields (the name accelerate reads when
            it splits each chunk between processes).

    Raises:
        ValueError: ``chunk_size`` does not divide ``batch_size``, or fewer examples than one
            batch.
    """

    def __init__(
        self, examples: Sequence[dict[str, Any]], batch_size: int, chunk_size: int, seed: int
    ) -> None:
        if batch_size < 1 or chunk_size < 1 or batch_size % chunk_size:
            raise ValueError(
                f"the chunk size {chunk_size} must divide the batch size {batch_size} (batch = "
                "micro-batch x processes x accumulation steps)"
            )
        if len(examples) < batch_size:
            raise ValueError(
                f"{len(examples)} training examples cannot fill one batch of {batch_size}; "
                "lower --batch-size or add data"
            )
        self.examples = examples
        self.step_size = batch_size
        self.batch_size = chunk_size
        self.drop_last = False  # read by accelerate; whole steps are kept here already
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.step_size

    def __len__(self) -> int:
        return self.steps_per_epoch() * (self.step_size // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):  # the same draws as one long-lived generator
            length_grouped_order(self.examples, self.step_size, generator)
        for group in length_grouped_order(self.examples, self.step_size, generator):
            if len(group) == self.step_size:
                for start in range(0, self.step_size, self.batch_size):
                    yield group[start : start + self.batch_size]


def calibration_batches(
    examples: Sequence[dict[str, Any]],
    collate: ExampleCollator,
    count: int,
    device: torch.device,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` examples in batches of ``batch_size``, in order: the Fisher pass's
    calibration set. The per-example estimators' scores do not depend on ``batch_size`` (only
    the peak memory does: one backward holds a batch's activations)."""
    chosen = list(examples[:count])
    batches = []
    for start in range(0, len(chosen), batch_size):
        batch = collate(chosen[start : start + batch_size])
        batches.append({key: value.to(device) for key, value in batch.items()})
    return batches


WARMUP = 0.1  # the fraction of the steps the schedule warms up over


def warmup_steps(steps: int, fraction: float = WARMUP) -> int:
    """The warm-up length of :func:`schedule`: ``fraction`` of the steps (floored), at least one.

    Raises:
        ValueError: ``fraction`` is not in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the warm-up fraction must be in (0, 1], got {fraction}")
    return max(1, int(steps * fraction + 1e-9))


def schedule(
    optimizer: torch.optim.Optimizer, steps: int, warmup: float = WARMUP
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over :func:`warmup_steps` (``warmup`` of the steps), then square-root
    decay to 0 at ``steps``.

    .. math:: \\eta_t = \\eta \\min(1, (t + 1) / w) \\sqrt{\\max(0, (T - t) / T)}

    Raises:
        ValueError: ``warmup`` is not in (0, 1].
    """
    length = warmup_steps(steps, warmup)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / length) * max(0.0, (steps - step) / steps) ** 0.5,
    )


def split_by_tokens(batch: dict[str, torch.Tensor], budget: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive row groups of a right-padded batch, each at most ``budget`` tokens when
    padded to its own longest row (a row longer than ``budget`` goes alone), with the columns
    beyond that row cut off (they are padding in every row of the group).

    Rows of one step are sorted by length (:class:`LengthGroupedBatches` sorts windows), so
    the groups pad little. The groups' summed losses equal the batch's.

    Raises:
        ValueError: ``budget`` < 1 or no ``attention_mask`` in the batch.
    """
    if budget < 1:
        raise ValueError(f"the token budget must be >= 1, got {budget}")
    if "attention_mask" not in batch:
        raise ValueError("splitting by tokens needs the batch's attention_mask")
    lengths = batch["attention_mask"].sum(dim=1).tolist()  # (B,) real tokens per row
    groups: list[tuple[int, int, int]] = []  # (start, stop, width)
    start, width = 0, 0
    for row, length in enumerate(lengths):
        wider = max(width, int(length))
        if row > start and wider * (row - start + 1) > budget:
            groups.append((start, row, width))
            start, wider = row, int(length)
        width = wider
    groups.append((start, len(lengths), width))
    return [
        {key: value[begin:stop, :columns] for key, value in batch.items()}
        for begin, stop, columns in groups
    ]
