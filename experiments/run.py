"""Quality runner: fine-tune and evaluate every (model, task, method, lr, seed) of a JSON config.

    python -m experiments.run experiments/configs/smoke.json --device cpu   # from the repo root

One JSON result per run at ``<results>/<config name>/<model>__<task>__<method>__seed<k>.json``
(``<method>`` carries an ``-lr...`` suffix when the config sweeps that family's learning
rates). Results already written are skipped (resumable); each file is written to a temporary
name and renamed (atomic). Several workers may run one config at once (one per core or GPU):
each claims a run with a ``<result>.lock`` file before training it. Per (model, task) the
base model's held-out metric and the Fisher scores of the calibration set are computed once
and cached under ``<results>/<config>/_cache``.
All methods of a seed get the same data in the same order, the same steps and schedule: the
command line's own training loop (``stiefel_peft.cli.trainer.fit`` on transformers' Trainer:
length-grouped seeded batches, linear warm-up over the config's ``warmup`` fraction of the
steps (10 % unless it says otherwise), then sqrt decay; gradient clipping at 1.0).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from experiments.classifier import head_modules, task_for_model
from experiments.evaluation import evaluate
from experiments.locks import claim, release
from experiments.methods import MethodContext, build_method
from experiments.metrics import update_metrics
from experiments.models import load_base_model
from experiments.protocol import RESULTS, RunSpec, load_config, plan
from experiments.tasks import Task, load_task
from stiefel_peft.cli.trainer import TrainingPlan, fit
from stiefel_peft.cli.training import calibration_batches
from stiefel_peft.cli.workflow import resolve_device
from stiefel_peft.fisher import FisherScores, estimate_fisher


def write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(json.dumps(payload, indent=2, default=str) + "\n")
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class Group:
    """The shared state of one (model, task): base model, task data, baseline, Fisher scores."""

    def __init__(
        self,
        config: dict[str, Any],
        model_entry: dict,
        task_entry: dict,
        device: torch.device,
        cache: Path,
        progress: bool,
    ) -> None:
        dtype = getattr(torch, config["dtype"])
        self.base, self.tokenizer = load_base_model(model_entry, device, dtype)
        self.task: Task = task_for_model(
            load_task(task_entry, self.tokenizer, config["split_seed"], config["max_length"]),
            self.base,
            model_entry["name"],
        )
        self.collate = self.task.collator(self.tokenizer)
        self.device = device
        key = f"{model_entry['name']}__{task_entry['name'].replace(':', '-')}"
        self.split = config["evaluate_on"]
        baseline_path = cache / f"baseline__{key}__{self.split}.json"
        if baseline_path.is_file():
            self.baseline = json.loads(baseline_path.read_text())
        else:
            start = time.perf_counter()
            self.baseline = {
                **evaluate(self.base, self.tokenizer, self.task, self.split),
                "seconds": time.perf_counter() - start,
            }
            write_atomic(baseline_path, self.baseline)
        self.calibration = calibration_batches(
            self.task.train,
            self.collate,
            config["calibration_examples"],
            device,
            config["calibration_batch_size"],
        )
        fisher_path = cache / f"fisher__{key}.json"
        if fisher_path.is_file():
            self.fisher = FisherScores.load(fisher_path)
        else:
            self.fisher = estimate_fisher(
                self.base, self.calibration, "empirical", progress=progress
            )
            fisher_path.parent.mkdir(parents=True, exist_ok=True)
            self.fisher.save(fisher_path)


def run_one(spec: RunSpec, group: Group, config: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Adapt a copy of the base model with ``spec.method``, train, evaluate; the result record."""
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    context = MethodContext(
        calibration=group.calibration,
        fisher=group.fisher,
        seed=spec.seed,
        lr=spec.lr,
        stiefel_lr=spec.stiefel_lr,
        relative_lr=spec.relative_lr,
        gradient_lr=spec.gradient_lr,
        estimated_lr=spec.estimated_lr,
        r=int(config["r"]),
        alpha=float(config["alpha"]),
        dropout=float(config["dropout"]),
        targets=tuple(config["targets"]) if config["targets"] else None,
        modules_to_save=head_modules(group.base) or None,  # a new classifier head trains too
    )
    model, optimizer, info = build_method(spec.method, copy.deepcopy(group.base), context)
    if any(g.get("distance_estimate") for g in optimizer.param_groups):
        # the rate estimated after each step (the step uses the one before); the groups are
        # read at each step: accelerate reloads the state dict, which replaces the group dicts
        trajectory = info["estimated_rate"] = []
        optimizer.register_step_post_hook(
            lambda stepped, *_: trajectory.append(
                max(g["distance"] for g in stepped.param_groups if g.get("distance_estimate"))
            )
        )
    built = time.perf_counter()
    plan = TrainingPlan(
        steps=int(config["steps"]),
        batch_size=int(config["batch_size"]),
        micro_batch_tokens=config["micro_batch_tokens"],
        max_grad_norm=float(config["max_grad_norm"]),
        warmup=float(config["warmup"]),
        seed=spec.seed,
    )
    trained_model, collate = group.task.training(model, group.collate)
    fitted = fit(
        trained_model, optimizer, group.task.train, collate, plan, device=group.device,
        progress=progress,
    )  # fmt: skip
    losses = fitted.losses
    trained = time.perf_counter()
    after = evaluate(model, group.tokenizer, group.task, group.split)
    evaluated = time.perf_counter()
    update = update_metrics(model)
    metric = group.task.metric
    return {
        "config": config["name"],
        "model": spec.model,
        "task": spec.task,
        "method": spec.method,
        "label": spec.label,
        "seed": spec.seed,
        "family": info.pop("family"),
        "lr": spec.lr,
        "stiefel_lr": spec.stiefel_lr,
        "relative_lr": spec.relative_lr,
        "gradient_lr": spec.gradient_lr,
        "estimated_lr": spec.estimated_lr,
        "metric": metric,
        "split": group.split,
        "higher_is_better": group.task.higher_is_better,
        "before": group.baseline[metric],
        "after": after[metric],
        "delta": after[metric] - group.baseline[metric],
        "before_all": {k: v for k, v in group.baseline.items() if k != "seconds"},
        "after_all": after,
        "trainable_parameters": info.pop("trainable_parameters"),
        "selected_blocks": info.pop("selected_blocks"),
        "num_blocks": len(group.fisher.per_block),
        "effective_rank_mean": update["effective_rank_mean"],
        "effective_rank_max_possible": update["effective_rank_max_possible"],
        "delta_w_fro_total": update["delta_w_fro_total"],
        "delta_w_fro_mean": update["delta_w_fro_mean"],
        "adapted_layers": update["adapted_layers"],
        "steps": int(config["steps"]),
        "warmup": float(config["warmup"]),
        "batch_size": config["batch_size"],
        "train_examples": len(group.task.train),
        "heldout_examples": len(group.task.split(group.split)),
        "train_examples_used": int(config["steps"]) * int(config["batch_size"]),
        "first_losses": losses[:5],
        "last_losses": losses[-5:],
        "seconds": {
            "build": built - started,
            "train": trained - built,
            "evaluate": evaluated - trained,
            "total": time.perf_counter() - started,
        },
        "device": str(group.device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "method_info": info,
        "per_layer": update["per_layer"],
    }


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path, help="a JSON config (experiments/configs/*.json)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="results root folder")
    parser.add_argument(
        "--methods", default=None, help="comma-separated subset of the config's methods"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and what is done")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    arguments = parser.parse_args(argv)
    if arguments.threads is not None:
        if arguments.threads < 1:
            parser.error(f"--threads must be >= 1, got {arguments.threads}")
        torch.set_num_threads(arguments.threads)
    config = load_config(arguments.config)
    if arguments.methods:
        config["methods"] = [m for m in config["methods"] if m in arguments.methods.split(",")]
    output = arguments.results / config["name"]
    runs = plan(config, arguments.results)
    done = {run for run in runs if (output / run.filename()).is_file()}
    if arguments.dry_run:
        for run in runs:
            print(("done " if run in done else "todo ") + run.filename())
        return {"trained": 0, "skipped": len(done), "busy": 0, "total": len(runs)}
    device = resolve_device(arguments.device)
    progress = not arguments.quiet
    counts = {"trained": 0, "skipped": 0, "busy": 0, "total": len(runs)}
    bar = tqdm(total=len(runs), disable=not progress, desc=config["name"], unit="run")
    groups: dict[tuple[str, str], Group] = {}
    models = {m["name"]: m for m in config["models"]}
    tasks = {t["name"]: t for t in config["tasks"]}
    for run in runs:
        path = output / run.filename()
        if run in done or path.is_file():
            counts["skipped"] += 1
            bar.update(1)
            continue
        if not claim(path):  # another worker is training it
            counts["busy"] += 1
            bar.update(1)
            continue
        try:
            if path.is_file():  # finished by another worker since the listing
                counts["skipped"] += 1
                bar.update(1)
                continue
            key = (run.model, run.task)
            if key not in groups:
                groups.clear()  # one base model in memory at a time
                groups[key] = Group(
                    config, models[run.model], tasks[run.task], device, output / "_cache", progress
                )
            bar.set_postfix_str(run.filename().removesuffix(".json"))
            write_atomic(path, run_one(run, groups[key], config, progress))
        finally:
            release(path)
        counts["trained"] += 1
        bar.update(1)
    bar.close()
    print(
        f"{config['name']}: {counts['trained']} trained, {counts['skipped']} already done, "
        f"{counts['busy']} left to other workers, {counts['total']} runs; results in {output}"
    )
    return counts


if __name__ == "__main__":
    main()
