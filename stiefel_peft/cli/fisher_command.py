"""``stiefel-peft fisher``: score the blocks of a model on data; print and save the table."""

from __future__ import annotations

from pathlib import Path

from stiefel_peft.cli.assets import load_model
from stiefel_peft.cli.settings import FisherSettings
from stiefel_peft.cli.training import calibration_batches
from stiefel_peft.cli.workflow import (
    collator,
    load_split_data,
    plot_block_scores,
    resolve_device,
    write_json,
)
from stiefel_peft.fisher import estimate_fisher
from stiefel_peft.fora import number_of_selected_blocks, select_top_blocks


def run(settings: FisherSettings) -> dict:
    """Score the blocks, print the table, save the scores, the plot and the run config."""
    data = load_split_data(settings)
    output = Path(settings.output)
    device = resolve_device(settings.device)
    model, tokenizer = load_model(settings.model, device=device, quantize=settings.quantize)
    collate = collator(tokenizer, data, settings)
    calibration = calibration_batches(
        data.train, collate, settings.calibration_examples, device, batch_size=settings.batch_size
    )
    scores = estimate_fisher(
        model, calibration, settings.estimator, seed=settings.seed, progress=not settings.quiet
    )
    count = number_of_selected_blocks(len(scores.per_block), settings.budget)
    selected = select_top_blocks(scores.per_block, count)
    top = max(scores.per_block.values()) or 1.0
    print(
        f"{settings.estimator} Fisher on {scores.num_examples} examples "
        f"({scores.seconds:.1f} s); * = top {count}"
    )
    print("block  score        relative")
    for index in sorted(scores.per_block):
        mark = "*" if index in selected else " "
        score = scores.per_block[index]
        print(f"{mark}{index:4d}  {score:11.4g}  {'#' * round(30 * score / top)}")
    output.mkdir(parents=True, exist_ok=True)
    scores.save(output / "fisher_scores.json")
    if not settings.no_plot:
        plot_block_scores(
            scores.per_block,
            selected,
            output / "fisher_scores.png",
            f"{settings.model}: {settings.estimator} Fisher per block",
        )
    write_json(output / "run_config.json", {"command": "fisher", **settings.to_dict()})
    print(f"saved to {output}")
    return scores.to_dict()
