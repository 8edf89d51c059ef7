"""Training on ``transformers.Trainer``: the answer-only loss, the application's data order and
schedule, gradient accumulation, precision, checkpoints, resume, Ctrl-C and a metrics log.

:func:`fit` is the one training loop of the application (``stiefel-peft finetune`` and the
quality study in ``experiments/`` call it). Trainer brings what people already know from it:
``checkpoint-<step>/`` folders (adapter, ``optimizer.pt``, ``scheduler.pt``, RNG states,
``trainer_state.json``), ``resume_from_checkpoint``, mixed precision on CUDA, data parallelism
under ``torchrun`` / ``accelerate launch``. What stays ours: the loss
(:func:`~stiefel_peft.cli.loss.supervised_loss`, summed over each forward pass and divided by
the step's supervised-token count, so that any split into passes and any number of processes
give the gradient of the whole batch), passes sized by a token budget (the activations a
backward holds grow with the tokens of its pass, not with the examples: a fixed example count
is either slow on short examples or large on long ones), the length-grouped seeded order
(:class:`~stiefel_peft.cli.training.LengthGroupedBatches`) and the warm-up/square-root schedule.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from stiefel_peft.cli.callbacks import (
    CopyIntoCheckpoints,
    Evaluation,
    LossBar,
    MetricsLog,
    StopOnInterrupt,
    tensorboard_callbacks,
)
from stiefel_peft.cli.loss import supervised_loss
from stiefel_peft.cli.training import (
    WARMUP,
    LengthGroupedBatches,
    schedule,
    split_by_tokens,
    warmup_steps,
)

__all__ = ["PRECISIONS", "FitResult", "TrainingPlan", "fit", "process_count"]

PRECISIONS = ("fp32", "bf16", "fp16")
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainingPlan:
    """How to train, whoever calls :func:`fit`.

    Attributes:
        steps: optimizer steps.
        batch_size: examples per optimizer step, all processes together (a multiple of the
            process count).
        micro_batch_tokens: the most padded tokens per forward pass on one process: each
            process's share of a step is cut into consecutive row groups within this budget
            and their gradients accumulated (None: the whole share in one pass).
        max_grad_norm: gradient clipping (global norm).
        warmup: the fraction of ``steps`` the schedule warms up over
            (:func:`~stiefel_peft.cli.training.schedule`).
        seed: the data order, dropout and initialisation seed.
        precision: ``fp32``, ``bf16`` (CUDA or CPU autocast) or ``fp16`` (CUDA, with loss
            scaling).
        save_every: write ``checkpoint-<step>/`` every this many steps (None: only on Ctrl-C).
        eval_every: call ``evaluate`` every this many steps and log its metrics (None: never).
        log_every: log the loss every this many steps.
    """

    steps: int
    batch_size: int = 16
    micro_batch_tokens: int | None = None
    max_grad_norm: float = 1.0
    warmup: float = WARMUP
    seed: int = 0
    precision: str = "fp32"
    save_every: int | None = None
    eval_every: int | None = None
    log_every: int = 1


@dataclass
class FitResult:
    """What :func:`fit` did.

    Attributes:
        losses: the logged training losses, one per ``log_every`` steps.
        step: the last completed optimizer step.
        interrupted: Ctrl-C stopped the run before its last step.
        checkpoint: the checkpoint written last (None when none was written).
        evaluations: the metrics of each evaluation during training, with their ``step``.
        passes_per_step: forward/backward passes per optimizer step on this process (mean).
    """

    losses: list[float]
    step: int
    interrupted: bool
    checkpoint: Path | None
    evaluations: list[dict[str, float]] = field(default_factory=list)
    passes_per_step: float = 1.0


def process_count() -> int:
    """The number of data-parallel processes (``WORLD_SIZE`` under torchrun, else 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


class AnswerOnlyTrainer(Trainer):
    """``Trainer`` with the answer-only loss, the application's batch sampler and passes
    within a token budget."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the step's token count itself

    def __init__(
        self,
        *args: Any,
        batch_sampler: LengthGroupedBatches,
        tokens_per_pass: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.batch_sampler = batch_sampler
        self.tokens_per_pass = tokens_per_pass
        self.passes = 0
        self.model_accepts_loss_kwargs = True  # Trainer then counts each step's tokens

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Trainer's step on each token-budget group of ``inputs`` in turn (gradients
        accumulate; under DDP only the last group's backward synchronises)."""
        budget = self.tokens_per_pass
        groups = [inputs] if budget is None else split_by_tokens(inputs, budget)
        self.passes += len(groups)
        total: torch.Tensor | None = None
        for index, group in enumerate(groups):
            last = index == len(groups) - 1
            with nullcontext() if last else self.accelerator.no_sync(model):
                loss = super().training_step(model, group, num_items_in_batch)
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def get_train_dataloader(self) -> DataLoader:
        loader = DataLoader(
            self.train_dataset,  # type: ignore[arg-type]
            batch_sampler=self.batch_sampler,
            collate_fn=self.data_collator,
        )
        return self.accelerator.prepare(loader)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Sum of the micro-batch's answer-token losses / the step's answer tokens (all
        micro-batches, all processes), times the processes (their gradients are averaged)."""
        if return_outputs:
            raise ValueError("the answer-only trainer does not return outputs")
        if num_items_in_batch is None:
            return supervised_loss(model, inputs)
        total = supervised_loss(model, inputs, reduction="sum")
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return total * processes / num_items_in_batch


def _arguments(
    plan: TrainingPlan, output: Path, per_process: int, device: torch.device, progress: bool
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output),
        max_steps=plan.steps,
        per_device_train_batch_size=per_process,
        gradient_accumulation_steps=1,
        max_grad_norm=plan.max_grad_norm,
        logging_strategy="steps",
        logging_steps=plan.log_every,
        save_strategy="steps" if plan.save_every else "no",
        save_steps=plan.save_every or 500,
        eval_strategy="no",
        report_to="none",
        seed=plan.seed,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        use_cpu=device.type == "cpu",
        ddp_backend="gloo" if device.type == "cpu" and process_count() > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        average_tokens_across_devices=True,
        accelerator_config={"split_batches": True},
        disable_tqdm=not progress,
    )


def fit(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    examples: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    plan: TrainingPlan,
    output: Path | None = None,
    *,
    device: torch.device | str = "cpu",
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    resume: Path | None = None,
    copy_into_checkpoints: Sequence[Path] = (),
    interruptible: bool = False,
    progress: bool = False,
) -> FitResult:
    """Train ``model`` with ``optimizer`` on ``examples`` for ``plan.steps`` steps.

    The schedule is :func:`~stiefel_peft.cli.training.schedule` (linear warm-up, square-root
    decay) over ``plan.steps``; gradients are clipped to ``plan.max_grad_norm``. With
    ``output``, ``metrics.jsonl`` gets one JSON record per log (``step``, ``loss``,
    ``grad_norm``, ``learning_rate``, evaluations as ``eval_*``), TensorBoard event files go to
    ``output/tensorboard`` when tensorboard is installed, and checkpoints to
    ``output/checkpoint-<step>``. The model is left in eval mode.

    Args:
        model: the (peft) model; its trainable parameters are ``optimizer``'s.
        optimizer: e.g. :func:`stiefel_peft.fora_optimizer`.
        examples: the training examples (dicts the collator takes).
        collate: examples -> a batch with ``input_ids``, ``attention_mask``, ``labels``.
        plan: the :class:`TrainingPlan`.
        output: the run's folder (None: a temporary folder, nothing kept).
        device: where the model is (``cpu`` or CUDA).
        evaluate: ``model -> metrics`` for ``plan.eval_every``.
        resume: a ``checkpoint-<step>`` folder of the same run: the adapter, optimizer,
            scheduler, RNG states and data position are restored, training continues.
        copy_into_checkpoints: files copied into each checkpoint (the run's settings).
        interruptible: Ctrl-C writes a checkpoint and stops (see :class:`StopOnInterrupt`).
        progress: show Trainer's progress bar.

    Raises:
        ValueError: a batch that the process count does not divide, a token budget < 1,
            fewer examples than one batch, an unknown precision, ``fp16`` without CUDA,
            ``eval_every`` without ``evaluate``, or a warm-up fraction outside (0, 1].
    """
    if plan.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {plan.precision!r}")
    device = torch.device(device)
    if plan.precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs CUDA; on the CPU use fp32 or bf16")
    if plan.eval_every and evaluate is None:
        raise ValueError("plan.eval_every needs an `evaluate` function")
    processes = process_count()
    if plan.batch_size % processes:
        raise ValueError(
            f"the batch size {plan.batch_size} must be a multiple of the {processes} processes"
        )
    if plan.micro_batch_tokens is not None and plan.micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {plan.micro_batch_tokens}")
    warmup_steps(plan.steps, plan.warmup)  # refuses a fraction outside (0, 1] before training
    sampler = LengthGroupedBatches(examples, plan.batch_size, plan.batch_size, plan.seed)
    metrics = MetricsLog(output / METRICS_FILE if output is not None else None)
    interrupt = StopOnInterrupt()
    callbacks: list[TrainerCallback] = [metrics, interrupt]
    evaluation = Evaluation(evaluate, plan.eval_every) if plan.eval_every and evaluate else None
    if evaluation is not None:
        callbacks.append(evaluation)
    if copy_into_checkpoints:
        callbacks.append(CopyIntoCheckpoints([Path(p) for p in copy_into_checkpoints]))
    with tempfile.TemporaryDirectory() if output is None else nullcontext(str(output)) as folder:
        if output is not None:
            callbacks.extend(tensorboard_callbacks(output))
        arguments = _arguments(plan, Path(folder), plan.batch_size // processes, device, progress)
        trainer = AnswerOnlyTrainer(
            model=model,
            args=arguments,
            train_dataset=list(examples),  # type: ignore[arg-type]
            data_collator=collate,
            optimizers=(optimizer, schedule(optimizer, plan.steps, plan.warmup)),
            callbacks=callbacks,
            batch_sampler=sampler,
            tokens_per_pass=plan.micro_batch_tokens,
        )
        trainer.remove_callback(PrinterCallback)  # its printed dicts, or its bar that
        trainer.remove_callback(ProgressCallback)  # prints them: LossBar shows the loss
        if progress:
            trainer.add_callback(LossBar())
        if evaluation is not None:
            evaluation.trainer = trainer
        with interrupt.installed() if interruptible else nullcontext():
            trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        step = trainer.state.global_step
        passes = trainer.passes
    model.eval()
    checkpoint = None
    if output is not None:
        saved = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        checkpoint = saved[-1] if saved else None
    return FitResult(
        losses=metrics.losses,
        step=step,
        interrupted=interrupt.stopped_at is not None,
        checkpoint=checkpoint,
        evaluations=metrics.evaluations,
        passes_per_step=passes / max(1, len(metrics.losses) * plan.log_every),
    )
