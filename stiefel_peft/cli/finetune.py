"""``stiefel-peft finetune``: score, select, adapt, train, evaluate, save."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stiefel_peft.cli.arguments import resolve_output
from stiefel_peft.cli.workflow import (
    accuracy,
    batches,
    calibration_batches,
    collator,
    load_task_data,
    plot_block_scores,
    resolve_device,
    write_json,
)
from stiefel_peft.cli.assets import load_model
from stiefel_peft.cli.loss import supervised_loss
from stiefel_peft.fora import FoRAConfig, apply_fora, fora_optimizer

DEFAULT_STEPS = 48


def _steps(arguments: argparse.Namespace, train_size: int) -> int:
    if arguments.steps is not None:
        return arguments.steps
    if arguments.epochs is not None:
        return max(1, math.ceil(arguments.epochs * train_size / arguments.batch_size))
    return DEFAULT_STEPS


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run(arguments: argparse.Namespace) -> dict:
    """Run the whole fine-tuning; return the report dict (also written to the output folder)."""
    started = time.perf_counter()
    say = (lambda *a: None) if arguments.quiet else print
    data = load_task_data(arguments)  # cheap; bad data stops here, before the model loads
    output = resolve_output(arguments)
    device = resolve_device(arguments.device)
    torch.manual_seed(arguments.seed)

    say(f"loading {arguments.model} on {device} ...")
    model, tokenizer = load_model(arguments.model, device=device)
    loaded = time.perf_counter()
    collate = collator(tokenizer, data, arguments)
    say(f"data: {len(data.train)} training, {len(data.heldout)} held-out examples ({data.kind})")
    before = accuracy(model, tokenizer, data, collate, arguments, device)
    evaluated_before = time.perf_counter()
    say(f"held-out accuracy before: {_points(before)}")

    config = FoRAConfig(
        budget=arguments.budget,
        r=arguments.rank,
        lora_alpha=arguments.alpha,
        lora_dropout=arguments.dropout,
        estimator=arguments.estimator,
        retraction=arguments.retraction,
        stiefel_factor=arguments.stiefel_factor,
        calibration_batches=None,
        seed=arguments.seed,
        lr=arguments.lr,
        stiefel_lr=arguments.stiefel_lr,
    )
    calibration = calibration_batches(data, collate, arguments, device)
    model = apply_fora(model, calibration=calibration, config=config, progress=not arguments.quiet)
    report = model.fora_report
    say(report.summary())

    steps = _steps(arguments, len(data.train))
    optimizer = fora_optimizer(model)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * max(0.0, (steps - step) / steps) ** 0.5,
    )
    stream = batches(
        data.train, collate, arguments.batch_size, device, arguments.seed, shuffle=True
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), disable=arguments.quiet, desc="training", unit="step")
    train_start = time.perf_counter()
    for _ in bar:
        batch = next(stream)
        optimizer.zero_grad(set_to_none=True)
        loss = supervised_loss(model, batch)  # only answer positions hit the vocabulary
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-8:]) / len(losses[-8:]):.3f}")
    trained = time.perf_counter()
    model.eval()
    after = accuracy(model, tokenizer, data, collate, arguments, device)
    evaluated_after = time.perf_counter()

    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    report.extra.update(
        {
            "model": arguments.model,
            "data": arguments.data,
            "task": data.kind,
            "label_names": list(data.label_names) if data.label_names else None,
            "train_examples": len(data.train),
            "heldout_examples": len(data.heldout),
            "accuracy_before": before,
            "accuracy_after": after,
            "steps": steps,
            "batch_size": arguments.batch_size,
            "first_losses": losses[:5],
            "last_losses": losses[-5:],
            "seconds": {
                "load": loaded - started,
                "evaluate_before": evaluated_before - loaded,
                "score": report.scoring_seconds,
                "train": trained - train_start,
                "evaluate_after": evaluated_after - trained,
                "total": time.perf_counter() - started,
            },
            "device": str(device),
        }
    )
    report.save(output)
    if not arguments.no_plot and report.per_block_scores:
        plot_block_scores(
            report.per_block_scores,
            report.selected_blocks,
            output / "fisher_scores.png",
            f"{arguments.model}: {report.estimator} Fisher per block (selected in red)",
        )
    write_json(
        output / "run_config.json",
        {"command": "finetune", **vars(arguments), "output": str(output)},
    )
    total = time.perf_counter() - started
    delta = "" if before is None or after is None else f" ({100 * (after - before):+.1f} points)"
    print(
        f"accuracy {_points(before)} -> {_points(after)}{delta} | {report.adapter_parameters:,} "
        f"adapter parameters = {report.parameter_ratio:.2f}x LoRA on every block | "
        f"{total:.0f} s | saved to {output}"
    )
    return report.to_dict()


def output_path(arguments: argparse.Namespace) -> Path:
    return resolve_output(arguments)
