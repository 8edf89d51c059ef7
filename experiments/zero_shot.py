"""Zero-shot check of candidate reasoning_gym tasks on the real model (run: docs/results.md).

    pip install reasoning-gym==0.1.25          # not part of the install path
    python -m experiments.zero_shot [--model smollm2-135m] [--heldout 300] [--device cpu]

For each candidate task (the prompt, answer format and exact-match scoring of the runner,
``experiments/tasks.py``) it prints and writes (``results/zero_shot.json``) the base
model's exact match, mean partial score and a few sample answers. A good task for the quality
runs has short answers and a zero-shot exact match well above 0 and well below 1 (room to
improve). Cost on 2 CPU cores: generation of <= 8 tokens for 300 prompts ~ 1-2 min per task.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from experiments.evaluation import evaluate, generate_answers
from experiments.models import load_base_model
from experiments.protocol import RESULTS
from experiments.run import write_atomic
from experiments.tasks import load_task
from stiefel_peft.cli.workflow import resolve_device

CANDIDATES = [
    {
        "name": "reasoning_gym:basic_arithmetic",
        "max_new_tokens": 8,
        "dataset_options": {
            "min_terms": 2,
            "max_terms": 3,
            "min_digits": 1,
            "max_digits": 2,
            "operators": ["+", "-", "*"],
            "allow_parentheses": False,
            "allow_negation": False,
        },
    },
    {
        "name": "reasoning_gym:chain_sum",
        "max_new_tokens": 8,
        "dataset_options": {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2},
    },
    {
        "name": "reasoning_gym:leg_counting",
        "max_new_tokens": 8,
        "dataset_options": {"min_animals": 1, "max_animals": 2},
    },
    {"name": "reasoning_gym:syllogism", "max_new_tokens": 4, "dataset_options": {}},
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="a models.py source")
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=RESULTS / "zero_shot.json")
    arguments = parser.parse_args(argv)
    import torch

    device = resolve_device(arguments.device)
    model, tokenizer = load_base_model(
        {"name": arguments.model, "source": arguments.model}, device, torch.float32
    )
    report = {"model": arguments.model, "heldout": arguments.heldout, "tasks": {}}
    for candidate in CANDIDATES:
        entry = {**candidate, "size": arguments.heldout + 50, "heldout": arguments.heldout}
        task = load_task(entry, tokenizer, split_seed=0, max_length=256)
        start = time.perf_counter()
        scores = evaluate(model, tokenizer, task)
        samples = task.heldout[:5]
        answers = generate_answers(
            model, tokenizer, [e["prompt"] for e in samples], task.max_new_tokens
        )
        report["tasks"][candidate["name"]] = {
            **scores,
            "seconds": time.perf_counter() - start,
            "options": candidate["dataset_options"],
            "samples": [
                {"question": e["entry"]["question"], "answer": e["entry"]["answer"], "model": a}
                for e, a in zip(samples, answers, strict=True)
            ],
        }
        print(
            f"{candidate['name']}: exact match {scores['exact_match']:.3f}, "
            f"mean score {scores['mean_score']:.3f} ({time.perf_counter() - start:.0f} s)"
        )
    write_atomic(arguments.output, report)
    return report


if __name__ == "__main__":
    main()
