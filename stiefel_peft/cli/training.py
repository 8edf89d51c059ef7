"""The application's training helpers: batch streams, the schedule and the one training loop.

Used by ``stiefel-peft finetune`` and by the quality study (``experiments/``) alike, so that
every number in ``docs/results.md`` comes from the loop the command line runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from stiefel_peft.cli.encoding import ExampleCollator
from stiefel_peft.cli.loss import supervised_loss

__all__ = [
    "batches",
    "calibration_batches",
    "length_grouped_order",
    "schedule",
    "train",
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
    batch pads to ~60), and the batches are shuffled again so lengths do not trend over time."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    window = 8 * batch_size
    groups: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: _length(examples[i]))
        groups.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    permutation = torch.randperm(len(groups), generator=generator).tolist()
    return [groups[i] for i in permutation]


def batches(
    examples: Sequence[dict[str, Any]],
    collate: ExampleCollator,
    batch_size: int,
    device: torch.device,
    seed: int,
    shuffle: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless HF batches on ``device``: in order, or shuffled and length-grouped (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        if shuffle:
            groups = length_grouped_order(examples, batch_size, generator)
        else:
            groups = [
                list(range(i, min(i + batch_size, len(examples))))
                for i in range(0, len(examples), batch_size)
            ]
        for indices in groups:
            batch = collate([examples[i] for i in indices])
            yield {key: value.to(device) for key, value in batch.items()}


def calibration_batches(
    examples: Sequence[dict[str, Any]],
    collate: ExampleCollator,
    count: int,
    device: torch.device,
    batch_size: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` examples in batches of ``batch_size``, in order: the Fisher pass's
    calibration set."""
    chosen = list(examples[:count])
    stream = batches(chosen, collate, batch_size, device, seed=0, shuffle=False)
    return [next(stream) for _ in range(math.ceil(len(chosen) / batch_size))]


def warmup_steps(steps: int) -> int:
    """The warm-up length of :func:`schedule`: 10 % of the steps, at least one."""
    return max(1, steps // 10)


def schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over :func:`warmup_steps`, then square-root decay to 0 at ``steps``.

    .. math:: \\eta_t = \\eta \\min(1, (t + 1) / w) \\sqrt{\\max(0, (T - t) / T)}
    """
    warmup = warmup_steps(steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * max(0.0, (steps - step) / steps) ** 0.5,
    )


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stream: Iterator[dict[str, torch.Tensor]],
    steps: int,
    max_grad_norm: float = 1.0,
    progress: bool = False,
) -> list[float]:
    """``steps`` optimizer steps on batches from ``stream``; returns the losses.

    Each step: the answer-only loss (:func:`~stiefel_peft.cli.loss.supervised_loss`, the value
    of ``model(**batch).loss`` with less vocabulary work), backward, gradient clipping at
    ``max_grad_norm``, the optimizer and the :func:`schedule`. The model is in train mode
    during the loop and left in eval mode.
    """
    scheduler = schedule(optimizer, steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), disable=not progress, desc="training", unit="step", leave=False)
    for _ in bar:
        batch = next(stream)
        optimizer.zero_grad(set_to_none=True)
        loss = supervised_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-8:]) / len(losses[-8:]):.3f}")
    model.eval()
    return losses
