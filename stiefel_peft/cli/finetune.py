"""``stiefel-peft finetune``: score, select, adapt, train, evaluate, save.

The run's folder gets ``run_config.json`` first (the settings, enough to replay or resume the
run), then ``metrics.jsonl`` and ``checkpoint-<step>/`` folders during training, and at the
end the adapter (a plain peft LoRA adapter with ``fora_config.json``), ``fora_report.json``
with the accuracies, times and per-phase peak memory, and the plot of the block scores.
Under ``torchrun`` every process scores its share of the calibration examples, the scores are
summed (so every rank selects the same blocks) and training is data-parallel; the first
process evaluates and writes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from stiefel_peft.cli.assets import load_model
from stiefel_peft.cli.memory import PhaseMemory
from stiefel_peft.cli.options import Interrupted
from stiefel_peft.cli.rate_search import search_rates
from stiefel_peft.cli.settings import FinetuneSettings
from stiefel_peft.cli.trainer import TrainingPlan, fit
from stiefel_peft.cli.training import calibration_batches
from stiefel_peft.cli.workflow import (
    SplitData,
    accuracy,
    collator,
    load_split_data,
    plot_block_scores,
    resolve_device,
    write_json,
)
from stiefel_peft.fora import apply_fora, fora_optimizer, load_fora_adapter


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def start_processes(device: torch.device) -> tuple[int, int]:
    """``(rank, processes)``; under torchrun (``WORLD_SIZE`` > 1) the process group is started
    here (gloo on the CPU, nccl on CUDA, through accelerate as Trainer does), before the Fisher
    pass needs it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=device.type == "cpu")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _selections(selected: list[int], processes: int) -> list[list[int]]:
    """Every rank's selected blocks (they sum their Fisher scores, so they must agree).

    Raises:
        RuntimeError: two ranks selected different blocks.
    """
    if processes == 1:
        return [list(selected)]
    gathered: list[Any] = [None] * processes
    torch.distributed.all_gather_object(gathered, list(selected))
    if any(blocks != gathered[0] for blocks in gathered):
        raise RuntimeError(f"the ranks selected different blocks: {gathered}")
    return gathered


def _barrier(processes: int) -> None:
    if processes > 1:
        torch.distributed.barrier()


def run(settings: FinetuneSettings) -> dict[str, Any]:
    """Run the whole fine-tuning; return the report dict (also written to the output folder).

    Raises:
        Interrupted: Ctrl-C during training (a checkpoint was written; the message says how to
            resume).
    """
    started = time.perf_counter()
    data = load_split_data(settings)  # cheap; bad data stops here, before the model loads
    output = Path(settings.output)
    device = resolve_device(settings.device)
    rank, processes = start_processes(device)
    main = rank == 0
    say = (lambda *a: None) if settings.quiet or not main else print
    resume = Path(settings.resume) if settings.resume else None
    if main:
        write_json(output / "run_config.json", {"command": "finetune", **settings.to_dict()})
    memory = PhaseMemory(device)
    torch.manual_seed(settings.seed)
    tokens_per_pass = settings.tokens_per_pass(device.type)
    seconds: dict[str, float] = {}

    def timed(name: str, since: float) -> float:
        now = time.perf_counter()
        seconds[name] = now - since
        return now

    say(f"loading {settings.model} on {device} ...")
    with memory.phase("load"):
        model, tokenizer = load_model(settings.model, device=device, quantize=settings.quantize)
    mark = timed("load", started)
    collate = collator(tokenizer, data, settings)
    say(f"data: {len(data.train)} training, {len(data.heldout)} held-out examples ({data.kind})")

    def heldout_accuracy() -> float | None:
        return accuracy(model, tokenizer, data, collate, settings, device)

    if resume is None:
        with memory.phase("evaluate_before"):
            before = heldout_accuracy() if main else None
        mark = timed("evaluate_before", mark)
        say(f"held-out accuracy before: {_points(before)}")
        calibration = calibration_batches(
            data.train[: settings.calibration_examples][rank::processes], collate,
            settings.calibration_examples, device, batch_size=settings.scoring_batch(device.type),
        )  # fmt: skip
        with memory.phase("score"):
            model = apply_fora(
                model, calibration=calibration, config=settings.fora_config(),
                progress=not settings.quiet and main,
            )  # fmt: skip
        report = model.fora_report
        report.extra["accuracy_before"] = before  # travels with every checkpoint
        report.extra["selected_blocks_per_rank"] = _selections(report.selected_blocks, processes)
    else:
        model = load_fora_adapter(model, resume, is_trainable=True)
        report = model.fora_report
        before = report.extra.get("accuracy_before")
        say(f"resuming from {resume} (held-out accuracy before: {_points(before)})")
    mark = timed("score", mark)
    say(report.summary())

    steps = settings.total_steps(len(data.train))
    plan = TrainingPlan(
        steps=steps, batch_size=settings.batch_size, micro_batch_tokens=tokens_per_pass,
        seed=settings.seed,
        precision=settings.precision, save_every=settings.save_every,
        eval_every=settings.eval_every if data.heldout else None,
    )  # fmt: skip
    with memory.phase("train"):
        if settings.lr_search:  # one run per rate; the held-out examples are not read
            search = search_rates(
                model, settings.lr_search, data.train, collate, plan, output,
                seeds=settings.lr_search_seeds, device=device, progress=not settings.quiet,
                say=say,
            )  # fmt: skip
            result = search.result
            report.extra["lr_search"] = search.to_dict()
        else:
            result = fit(
                model, fora_optimizer(model), data.train, collate, plan, output, device=device,
                evaluate=lambda m: {"accuracy": heldout_accuracy() or 0.0},
                resume=resume, copy_into_checkpoints=[output / "run_config.json"],
                interruptible=True, progress=not settings.quiet and main,
            )  # fmt: skip
    mark = timed("train", mark)
    if result.interrupted:
        raise Interrupted(
            f"interrupted after step {result.step} of {steps}; checkpoint written to "
            f"{result.checkpoint}; resume with: stiefel-peft finetune --resume {result.checkpoint}"
        )
    _barrier(processes)
    if not main:
        return {}
    with memory.phase("evaluate_after"):
        after = heldout_accuracy()
    timed("evaluate_after", mark)
    seconds["total"] = time.perf_counter() - started
    _save(model, report, settings, data, output, before, after, result, seconds, memory,
          tokens_per_pass)  # fmt: skip
    delta = "" if before is None or after is None else f" ({100 * (after - before):+.1f} points)"
    if settings.lr_search:
        search = report.extra["lr_search"]
        delta += f" at lr {search['chosen']:g}"
        if len(search["seeds"]) > 1:
            delta += f" (lowest mean final loss over {len(search['seeds'])} seeds)"
        if search["edge"] is not None:  # said even when --quiet: the grid may need extending
            delta += f", the {search['edge']} rate tried: a better one may lie beyond it"
    print(
        f"accuracy {_points(before)} -> {_points(after)}{delta} | {report.adapter_parameters:,} "
        f"adapter parameters = {report.parameter_ratio:.2f}x LoRA on every block | "
        f"{seconds['total']:.0f} s | {memory.summary()} | saved to {output}"
    )
    return report.to_dict()


def _save(
    model: torch.nn.Module, report: Any, settings: FinetuneSettings, data: SplitData,
    output: Path, before: float | None, after: float | None, result: Any,
    seconds: dict[str, float], memory: PhaseMemory, tokens_per_pass: int | None,
) -> None:  # fmt: skip
    model.save_pretrained(output)
    report.extra.update(
        {
            "model": settings.model,
            "data": settings.data,
            "task": data.kind,
            "label_names": list(data.label_names) if data.label_names else None,
            "train_examples": len(data.train),
            "heldout_examples": len(data.heldout),
            "accuracy_before": before,
            "accuracy_after": after,
            "steps": result.step,
            "batch_size": settings.batch_size,
            "micro_batch_tokens": tokens_per_pass,
            "passes_per_step": result.passes_per_step,
            "first_losses": result.losses[:5],
            "last_losses": result.losses[-5:],
            "evaluations": result.evaluations,
            "seconds": seconds,
            "memory": memory.to_dict(),
            "device": str(model.device) if hasattr(model, "device") else settings.device,
        }
    )
    report.save(output)
    if not settings.no_plot and report.per_block_scores:
        plot_block_scores(
            report.per_block_scores,
            report.selected_blocks,
            output / "fisher_scores.png",
            f"{settings.model}: {report.estimator} Fisher per block (selected in red)",
        )
