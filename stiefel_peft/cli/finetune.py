"""``stiefel-peft finetune``: score, select, adapt, train, evaluate, save."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from stiefel_peft.cli.assets import load_model
from stiefel_peft.cli.settings import FinetuneSettings
from stiefel_peft.cli.training import batches, calibration_batches, train
from stiefel_peft.cli.workflow import (
    accuracy,
    collator,
    load_split_data,
    plot_block_scores,
    resolve_device,
    write_json,
)
from stiefel_peft.fora import apply_fora, fora_optimizer


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run(settings: FinetuneSettings) -> dict:
    """Run the whole fine-tuning; return the report dict (also written to the output folder)."""
    started = time.perf_counter()
    say = (lambda *a: None) if settings.quiet else print
    data = load_split_data(settings)  # cheap; bad data stops here, before the model loads
    output = Path(settings.output)
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)

    say(f"loading {settings.model} on {device} ...")
    model, tokenizer = load_model(settings.model, device=device, quantize=settings.quantize)
    loaded = time.perf_counter()
    collate = collator(tokenizer, data, settings)
    say(f"data: {len(data.train)} training, {len(data.heldout)} held-out examples ({data.kind})")
    before = accuracy(model, tokenizer, data, collate, settings, device)
    evaluated_before = time.perf_counter()
    say(f"held-out accuracy before: {_points(before)}")

    calibration = calibration_batches(data.train, collate, settings.calibration_examples, device)
    model = apply_fora(
        model, calibration=calibration, config=settings.fora_config(), progress=not settings.quiet
    )
    report = model.fora_report
    say(report.summary())

    steps = settings.total_steps(len(data.train))
    optimizer = fora_optimizer(model)
    stream = batches(data.train, collate, settings.batch_size, device, settings.seed, shuffle=True)
    train_start = time.perf_counter()
    losses = train(model, optimizer, stream, steps, progress=not settings.quiet)
    trained = time.perf_counter()
    after = accuracy(model, tokenizer, data, collate, settings, device)
    evaluated_after = time.perf_counter()

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
            "steps": steps,
            "batch_size": settings.batch_size,
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
    if not settings.no_plot and report.per_block_scores:
        plot_block_scores(
            report.per_block_scores,
            report.selected_blocks,
            output / "fisher_scores.png",
            f"{settings.model}: {report.estimator} Fisher per block (selected in red)",
        )
    write_json(output / "run_config.json", {"command": "finetune", **settings.to_dict()})
    total = time.perf_counter() - started
    delta = "" if before is None or after is None else f" ({100 * (after - before):+.1f} points)"
    print(
        f"accuracy {_points(before)} -> {_points(after)}{delta} | {report.adapter_parameters:,} "
        f"adapter parameters = {report.parameter_ratio:.2f}x LoRA on every block | "
        f"{total:.0f} s | saved to {output}"
    )
    return report.to_dict()
