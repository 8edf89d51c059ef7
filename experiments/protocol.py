"""The plan of a quality-runner config: its keys and defaults, the learning rates a sweep chose
on validation, and the list of runs (model, task, method, rates, seed) it asks for.

A learning-rate family lists its rates under ``learning_rates``: ``"adamw"`` plain rates,
``"stiefel"`` ``[A, B]`` pairs, where A is a rate, ``{"relative": c}`` (A's rate ``c * RMS(W)``
per adapted layer, ``FoRAConfig.relative_lr``) or ``{"gradient": c}`` (one rate
``c / sqrt(g)`` from the free factors' gradient at initialisation,
``experiments.rates.gradient_scaled_rate``; B may then be ``null``: B and any head share it)
or ``{"estimated": c}`` (A and any head at ``c`` times Prodigy's rate estimated while training,
``fora_optimizer(distance_estimate=True)``; B at its own rate).
With ``learning_rates_from`` each method runs at the rates that its sweep configs chose on their
validation split.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.methods import METHODS
from experiments.tasks import SPLITS
from stiefel_peft.cli.training import WARMUP, warmup_steps

__all__ = ["DEFAULTS", "RESULTS", "RunSpec", "chosen_learning_rates", "load_config", "plan"]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULTS: dict[str, Any] = {
    "seeds": [0],
    "steps": 100,
    "batch_size": 16,
    "calibration_examples": 128,
    "calibration_batch_size": 8,
    "r": 32,
    "alpha": 64.0,
    "dropout": 0.05,
    "targets": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "max_length": 128,
    "split_seed": 0,
    "dtype": "float32",
    "max_grad_norm": 1.0,
    "learning_rates": {"adamw": [2e-4], "stiefel": [[2e-4, 1e-3]]},
    "learning_rates_from": None,
    "evaluate_on": "test",
    "micro_batch_tokens": None,
    "warmup": WARMUP,  # the fraction of the steps in linear warm-up, the command line's
}


@dataclass(frozen=True)
class RunSpec:
    model: str
    task: str
    method: str
    seed: int
    lr: float | None  # None: A's rate is weight-scaled (relative_lr)
    stiefel_lr: float | None
    label: str  # method name, with an lr suffix when the family's lr is swept
    relative_lr: float | None = None
    gradient_lr: float | None = None
    estimated_lr: float | None = None  # the multiplier of the estimated rate

    def filename(self) -> str:
        task = self.task.replace(":", "-")
        return f"{self.model}__{task}__{self.label}__seed{self.seed}.json"


def load_config(path: Path) -> dict[str, Any]:
    """The config with defaults filled in; ``name`` defaults to the file's stem.

    Raises:
        ValueError: an unknown key, method, a learning-rate family without values, or a
            ``warmup`` outside (0, 1].
    """
    raw = json.loads(Path(path).read_text())
    known = set(DEFAULTS) | {"name", "models", "tasks", "methods", "description"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}; known keys: {sorted(known)}")
    config = {**copy.deepcopy(DEFAULTS), **raw}
    config.setdefault("name", Path(path).stem)
    for key in ("models", "tasks", "methods"):
        if not config.get(key):
            raise ValueError(f"{path}: `{key}` must be a non-empty list")
    bad = [m for m in config["methods"] if m not in METHODS]
    if bad:
        raise ValueError(f"{path}: unknown methods {bad}; known: {list(METHODS)}")
    try:  # the command line's own check, so that a bad config fails when it loads
        warmup_steps(1, float(config["warmup"]))  # the length does not matter here
    except ValueError as error:
        raise ValueError(f"{path}: `warmup`: {error}") from error
    if config["evaluate_on"] not in SPLITS:
        raise ValueError(f"{path}: evaluate_on must be one of {SPLITS}")
    for family in {METHODS[m].family for m in config["methods"]}:
        if not config["learning_rates_from"] and not config["learning_rates"].get(family):
            raise ValueError(f"{path}: learning_rates[{family!r}] needs at least one value")
    for value in config["learning_rates"].get("adamw", []):
        if not isinstance(value, (int, float)):
            raise ValueError(f"{path}: learning_rates['adamw'] takes plain rates, got {value!r}")
    for value in config["learning_rates"].get("stiefel", []):
        a_rate = value[0] if isinstance(value, list) and len(value) == 2 else None
        if isinstance(a_rate, dict) and set(a_rate) not in (
            {"relative"}, {"gradient"}, {"estimated"}
        ):  # fmt: skip
            a_rate = None
        if (
            a_rate is not None
            and value[1] is None
            and not (isinstance(a_rate, dict) and "gradient" in a_rate)
        ):
            a_rate = None  # only a gradient-scaled rate can stand in for B's
        if a_rate is None:
            raise ValueError(
                f"{path}: learning_rates['stiefel'] takes [A, B] pairs, A a rate, "
                f'{{"relative": rate per unit of weight RMS}}, {{"gradient": c}} (B may then '
                "be null: tied to A's rate) or "
                f'{{"estimated": c}}; got {value!r}'
            )
    return config


def chosen_learning_rates(
    sweep: str | list[str], results: Path
) -> dict[tuple[str, str, str], tuple[float | None, ...]]:
    """Per (model, task, method): the rates with the best validation metric in the sweep
    configs' results (one config's name or a list of them, e.g. a sweep and a re-run of its
    rates on more seeds; mean over all their seeds per rate; ties: the smaller rate).

    Raises:
        ValueError: a sweep has no results, or they were not scored on validation.
    """
    records: list[dict[str, Any]] = []
    for name in [sweep] if isinstance(sweep, str) else sweep:
        found = [json.loads(p.read_text()) for p in sorted((results / name).glob("*.json"))]
        if not found:
            raise ValueError(f"learning_rates_from {name!r}: no results in {results / name}")
        if any(record.get("split") != "validation" for record in found):
            raise ValueError(f"learning_rates_from {name!r}: its runs must be scored on validation")
        records += found
    scores: dict[tuple[str, str, str], dict[tuple, list[float]]] = {}
    for record in records:
        key = (record["model"], record["task"], record["method"])
        rates = (
            record["lr"], record["stiefel_lr"], record.get("relative_lr"),
            record.get("gradient_lr"), record.get("estimated_lr"),
        )  # fmt: skip
        sign = 1.0 if record.get("higher_is_better", True) else -1.0
        scores.setdefault(key, {}).setdefault(rates, []).append(sign * record["after"])
    return {
        key: max(by_rate, key=lambda r: (sum(by_rate[r]) / len(by_rate[r]), -(r[0] or r[2] or 0.0)))
        for key, by_rate in scores.items()
    }


def plan(config: dict[str, Any], results: Path = RESULTS) -> list[RunSpec]:
    """Every run of the config, grouped by model then task (each loaded once). With
    ``learning_rates_from`` each method runs at the rates its sweep chose on validation.

    Raises:
        ValueError: a method or (model, task) that the sweep does not cover.
    """
    chosen = (
        chosen_learning_rates(config["learning_rates_from"], results)
        if config["learning_rates_from"]
        else None
    )
    runs = []
    for model in config["models"]:
        for task in config["tasks"]:
            for seed in config["seeds"]:
                for method in config["methods"]:
                    family = METHODS[method].family
                    values = config["learning_rates"][family]
                    if chosen is not None:
                        key = (model["name"], task["name"], method)
                        if key not in chosen:
                            raise ValueError(f"the sweep chose no rates for {key}")
                        lr, slr, relative, gradient, estimated = chosen[key]
                        a_rate = (
                            {"relative": relative}
                            if relative is not None
                            else {"gradient": gradient}
                            if gradient is not None
                            else {"estimated": estimated}
                            if estimated is not None
                            else lr
                        )
                        values = [[a_rate, slr]] if family == "stiefel" else [lr]
                    for value in values:
                        lr, stiefel_lr = (
                            (value[0], value[1]) if family == "stiefel" else (value, None)
                        )
                        relative = lr.get("relative") if isinstance(lr, dict) else None
                        gradient = lr.get("gradient") if isinstance(lr, dict) else None
                        estimated = lr.get("estimated") if isinstance(lr, dict) else None
                        lr = None if isinstance(lr, dict) else float(lr)
                        label = method
                        # a validation run is a rate choice: its label always names its rates,
                        # so a one-rate grid extension lines up with the sweep it extends
                        if len(values) > 1 or config["evaluate_on"] == "validation":
                            if lr is not None:
                                label += f"-lr{lr:g}"
                            elif relative is not None:
                                label += f"-rlr{relative:g}"
                            elif estimated is not None:
                                label += f"-elr{estimated:g}"
                            else:
                                label += f"-glr{gradient:g}"
                            label += f"-slr{stiefel_lr:g}" if stiefel_lr else ""
                        runs.append(
                            RunSpec(
                                model["name"],
                                task["name"],
                                method,
                                int(seed),
                                lr,
                                stiefel_lr,
                                label,
                                relative,
                                gradient,
                                estimated,
                            )
                        )
    return runs
