"""``stiefel-peft fisher``: score the blocks of a model on data; print and save the table."""

from __future__ import annotations

import argparse

from stiefel_peft.cli.arguments import resolve_output
from stiefel_peft.cli.workflow import (
    calibration_batches,
    collator,
    load_task_data,
    plot_block_scores,
    resolve_device,
    write_json,
)
from stiefel_peft.cli.assets import load_model
from stiefel_peft.fisher import estimate_fisher
from stiefel_peft.fora import number_of_selected_blocks
from stiefel_peft.fora import select_top_blocks


def run(arguments: argparse.Namespace) -> dict:
    data = load_task_data(arguments)
    output = resolve_output(arguments)
    device = resolve_device(arguments.device)
    model, tokenizer = load_model(arguments.model, device=device)
    collate = collator(tokenizer, data, arguments)
    calibration = calibration_batches(
        data, collate, arguments, device, batch_size=arguments.batch_size
    )
    scores = estimate_fisher(
        model, calibration, arguments.estimator, seed=arguments.seed, progress=not arguments.quiet
    )
    count = number_of_selected_blocks(len(scores.per_block), arguments.budget)
    selected = select_top_blocks(scores.per_block, count)
    top = max(scores.per_block.values()) or 1.0
    print(
        f"{arguments.estimator} Fisher on {scores.num_examples} examples "
        f"({scores.seconds:.1f} s); * = top {count}"
    )
    print("block  score        relative")
    for index in sorted(scores.per_block):
        mark = "*" if index in selected else " "
        score = scores.per_block[index]
        print(f"{mark}{index:4d}  {score:11.4g}  {'#' * round(30 * score / top)}")
    output.mkdir(parents=True, exist_ok=True)
    scores.save(output / "fisher_scores.json")
    if not arguments.no_plot:
        plot_block_scores(
            scores.per_block,
            selected,
            output / "fisher_scores.png",
            f"{arguments.model}: {arguments.estimator} Fisher per block",
        )
    write_json(
        output / "run_config.json", {"command": "fisher", **vars(arguments), "output": str(output)}
    )
    print(f"saved to {output}")
    return scores.to_dict()
