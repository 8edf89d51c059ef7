"""Typed settings of the command line: what a run is, independent of argparse.

``stiefel-peft finetune`` parses its options into a :class:`FinetuneSettings`, ``fisher`` into
a :class:`FisherSettings`; every step of the application takes these (or plain values), never
an argparse Namespace, so a run can be built in code, saved as ``run_config.json`` and
replayed. The FoRA and optimizer defaults are the library's own
(:class:`stiefel_peft.FoRAConfig`): one place for each default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from stiefel_peft.fora import FoRAConfig

__all__ = [
    "DEFAULT_DATA",
    "DEFAULT_LABEL_NAMES",
    "DEFAULT_MODEL",
    "DEFAULT_STEPS",
    "DEFAULT_TEMPLATE",
    "DataSettings",
    "FinetuneSettings",
    "FisherSettings",
]

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATA = "rotten-tomatoes"
DEFAULT_LABEL_NAMES = "negative,positive"
DEFAULT_TEMPLATE = "Review: {text}\nSentiment (positive or negative):"
DEFAULT_STEPS = 48
# A training pass holds ~2 MB per token on SmolLM2-135M (its activations for the backward):
# the budget bounds the run's peak memory (1.45 GB at 128 with the ~1.05 GB of weights and
# libraries); measured step time is within noise of one pass per step.
CPU_MICRO_BATCH_TOKENS = 128
_LIBRARY = FoRAConfig()  # the library's defaults, read once


@dataclass
class DataSettings:
    """The model, the data, its encoding and the run's outputs (shared by every command).

    Attributes:
        model: a built-in model name, a local Hugging Face folder or a hub id (``org/name``).
        data: a built-in data set, a .csv/.jsonl/.json file, a folder saved with
            ``datasets``' ``save_to_disk``, or a hub dataset name.
        split: the training split of a dataset with named splits (None: ``train``).
        eval_split: a split whose examples are held out (None: hold out training rows).
        text_column: the text column of a classification file.
        label_column: the label column of a classification file.
        label_names: comma-separated label names (None: the built-in's, or the file's).
        prompt_column: the prompt column of a prompt/completion file (None: classification).
        completion_column: the completion column of a prompt/completion file.
        template: the prompt of a classification example; ``{text}`` is replaced.
        max_length: tokens per example.
        heldout: held-out examples scored before and after (of ``eval_split`` when given).
        calibration_examples: training examples scored by the Fisher pass.
        estimator: the Fisher estimator.
        quantize: load the base model's linear layers in 4-bit (``"nf4"``: QFoRA), or None.
        seed: the seed of the split, the initialisation and the data order.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        output: the output folder (resolved and created before the model loads).
        no_plot: do not write the plot of the block scores.
        quiet: no progress bars.
    """

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    split: str | None = None
    eval_split: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    label_names: str | None = None
    prompt_column: str | None = None
    completion_column: str = "completion"
    template: str = DEFAULT_TEMPLATE
    max_length: int = 96
    heldout: int = 300
    calibration_examples: int = 64
    estimator: str = _LIBRARY.estimator
    quantize: str | None = None
    seed: int = 0
    device: str = "auto"
    output: str | None = None
    no_plot: bool = False
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        """Settings from a dict (``run_config.json``); unknown keys raise ``ValueError``."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known - {"command"})
        if unknown:
            raise ValueError(f"unknown settings {unknown}; known: {sorted(known)}")
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class FinetuneSettings(DataSettings):
    """``stiefel-peft finetune``: the data settings plus FoRA and training.

    Attributes:
        budget: fraction of blocks adapted (``FoRAConfig.budget``).
        rank: LoRA rank (``FoRAConfig.r``).
        alpha: LoRA alpha (``FoRAConfig.lora_alpha``).
        dropout: LoRA dropout (``FoRAConfig.lora_dropout``).
        retraction: retraction of the Stiefel step.
        stiefel_factor: the factor kept orthonormal, ``"B"`` or ``"A"``.
        init: the initialisation (``FoRAConfig.init``).
        selection: how the scores choose the adapted layers (``FoRAConfig.selection``).
        steps: optimizer steps (None: from ``epochs``, else :data:`DEFAULT_STEPS`).
        epochs: passes over the training split (instead of ``steps``).
        batch_size: examples per optimizer step (all processes together).
        micro_batch_tokens: the most padded tokens per forward pass on one process; each
            step's examples are cut into passes within it and their gradients accumulated.
            None: :data:`CPU_MICRO_BATCH_TOKENS` on the CPU (the activations a backward holds
            grow with its tokens: this bounds the run's peak memory at no cost in step time),
            the whole batch on CUDA. The Fisher pass scores ``budget // max_length`` examples
            at a time.
        precision: ``fp32``, ``bf16`` or ``fp16`` (CUDA only).
        save_every: write ``<output>/checkpoint-<step>/`` every this many steps.
        eval_every: score the held-out examples every this many steps (``metrics.jsonl``).
        resume: a ``checkpoint-<step>`` folder to continue from.
        lr: None (the library's weight-scaled default), or one fixed AdamW learning rate
            of ``lora_A`` and any other trainable parameter (``FoRAConfig.lr``).
        stiefel_lr: learning rate of the Stiefel factor.
        relative_lr: None, or ``lora_A``'s rate per unit of the adapted weight's RMS
            (``FoRAConfig.relative_lr``; with neither rate given the library's
            ``DEFAULT_RELATIVE_LR``).
        lr_search: None, or the rates to try: one full-length run per rate (A's and B's rates
            tied), keeping the lowest final training loss
            (:mod:`stiefel_peft.cli.rate_search`); ``lr`` and ``stiefel_lr`` are then unused.
        lr_search_seeds: with ``lr_search``, the training seeds per rate (``seed`` onwards):
            the rate with the lowest mean final loss over them is kept.
        train_examples: use at most this many training examples.
    """

    budget: float = _LIBRARY.budget
    rank: int = _LIBRARY.r
    alpha: float = _LIBRARY.lora_alpha
    dropout: float = _LIBRARY.lora_dropout
    retraction: str = _LIBRARY.retraction
    stiefel_factor: str = _LIBRARY.stiefel_factor
    init: str = _LIBRARY.init
    selection: str = _LIBRARY.selection
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 16
    micro_batch_tokens: int | None = None
    precision: str = "fp32"
    save_every: int | None = None
    eval_every: int | None = None
    resume: str | None = None
    lr: float | None = _LIBRARY.lr
    stiefel_lr: float = _LIBRARY.stiefel_lr
    relative_lr: float | None = _LIBRARY.relative_lr
    lr_search: list[float] | None = None
    lr_search_seeds: int = 1
    train_examples: int | None = None

    def fora_config(self) -> FoRAConfig:
        """The library config of this run (every calibration batch is scored)."""
        return FoRAConfig(
            budget=self.budget,
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            estimator=self.estimator,
            retraction=self.retraction,
            stiefel_factor=self.stiefel_factor,
            init=self.init,
            selection=self.selection,
            calibration_batches=None,
            seed=self.seed,
            lr=self.lr,
            stiefel_lr=self.stiefel_lr,
            relative_lr=self.relative_lr,
        )

    def total_steps(self, train_size: int) -> int:
        """``steps``, or ``ceil(epochs * train_size / batch_size)``, or the default 48."""
        if self.steps is not None:
            return self.steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * train_size / self.batch_size))
        return DEFAULT_STEPS

    def tokens_per_pass(self, device_type: str) -> int | None:
        """:attr:`micro_batch_tokens`, or its default on ``device_type`` (see above)."""
        if self.micro_batch_tokens is not None:
            return self.micro_batch_tokens
        return CPU_MICRO_BATCH_TOKENS if device_type == "cpu" else None

    def scoring_batch(self, device_type: str) -> int:
        """Examples per Fisher-pass batch: twice as many of ``max_length`` as the pass budget
        holds (the Fisher pass runs in eval mode, without dropout copies or optimizer state,
        at about half the memory per token), at least one; 8 without a budget."""
        budget = self.tokens_per_pass(device_type)
        return 8 if budget is None else max(1, 2 * budget // self.max_length)


@dataclass
class FisherSettings(DataSettings):
    """``stiefel-peft fisher``: the data settings plus the scoring batch and the budget."""

    batch_size: int = 2
    budget: float = _LIBRARY.budget
