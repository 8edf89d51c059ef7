"""The callbacks :func:`~stiefel_peft.cli.trainer.fit` hands to ``transformers.Trainer``: the
metrics log, evaluation during training, run files copied into checkpoints, a progress bar,
Ctrl-C as "checkpoint and stop", and TensorBoard when it is installed."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

__all__ = [
    "CopyIntoCheckpoints",
    "Evaluation",
    "LossBar",
    "MetricsLog",
    "StopOnInterrupt",
    "tensorboard_callbacks",
]


class MetricsLog(TrainerCallback):
    """Collects the logged losses and appends every log record to ``metrics.jsonl``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.losses: list[float] = []
        self.evaluations: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        if "loss" in logs:
            self.losses.append(float(logs["loss"]))
        if any(key.startswith("eval_") for key in logs):
            self.evaluations.append({"step": state.global_step, **logs})
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, default=float) + "\n")


class Evaluation(TrainerCallback):
    """Every ``every`` steps, ``evaluate(model)`` on the main process, logged as ``eval_*``."""

    def __init__(self, evaluate: Callable[[torch.nn.Module], dict[str, float]], every: int):
        self.evaluate = evaluate
        self.every = every
        self.trainer: Trainer | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step % self.every or not state.is_world_process_zero:
            return
        was_training = model.training
        try:
            metrics = self.evaluate(model)
        finally:
            model.train(was_training)
        assert self.trainer is not None
        should_log = control.should_log  # Trainer.log clears it: keep this step's loss record
        self.trainer.log({f"eval_{key}": value for key, value in metrics.items()})
        control.should_log = should_log


class CopyIntoCheckpoints(TrainerCallback):
    """Copies the run's files (``run_config.json``) into each checkpoint folder."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for file in self.files:
            if file.is_file():
                (folder / file.name).write_bytes(file.read_bytes())


class LossBar(TrainerCallback):
    """A progress bar over the steps with the latest loss (instead of Trainer's printed dicts)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training",
                            unit="step", leave=False)  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopOnInterrupt(TrainerCallback):
    """Ctrl-C (SIGINT) during training: finish the step, write a checkpoint, stop.

    A second Ctrl-C aborts at once (``KeyboardInterrupt``). With several processes the flag is
    agreed on (one all-reduce per step), so every rank stops after the same step.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\ninterrupted: finishing this step and writing a checkpoint (Ctrl-C again aborts)",
            file=sys.stderr,
            flush=True,
        )

    @contextmanager
    def installed(self) -> Iterator[None]:
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        requested = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(requested)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step


def tensorboard_callbacks(output: Path) -> list[TrainerCallback]:
    """TensorBoard logging to ``<output>/tensorboard`` when tensorboard is installed, else none."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback
    except ImportError:
        return []
    return [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(output / "tensorboard")))]
