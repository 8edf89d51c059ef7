"""``estimate_fisher``: diagonal-Fisher importance of every linear layer of a transformer.

Notation: ``N`` examples (in ``M`` batches), ``loss_n`` example n's own loss (the value of
``model(**example_n).loss``, see :mod:`stiefel_peft.fisher.losses`),
``L_b = model(**batch_b).loss``,
``theta`` a linear layer's weight and bias. Per module:

- ``"empirical"`` (default): ``(1/N) sum_n ||grad_theta loss_n||^2``, exact, from one batched
  backward of ``sum_n loss_n`` and the layers' inputs and output gradients
  (:mod:`stiefel_peft.fisher.norms`); no weight gradient is ever formed.
- ``"empirical_batch"``: ``(1/M) sum_b ||grad_theta L_b||^2``, the official FoRA code's score;
  it estimates ``||mean gradient||^2 + variance / B`` and so depends on the batch size B.
- ``"sampled"``: ``(1/(N S)) sum_n sum_s ||grad_theta loss_n(y_{n,s})||^2`` with
  ``y_{n,s} ~ p_theta(y | x_n)`` drawn at the labelled positions (S = ``num_samples``, a
  ``torch.Generator`` seeded with ``seed``): the Monte Carlo estimate of the true Fisher.
- ``"taylor"``: ``sum_ij |theta_ij g_ij|`` with ``g = (1/M) sum_b grad_theta L_b``.
- ``"kfac_trace"``: ``tr(A) tr(G)`` with ``A`` the mean of ``[x, 1][x, 1]^T`` over valid tokens
  and ``G = (1/N) sum_n sum_t delta_{n,t} delta_{n,t}^T`` from the per-example losses
  (:class:`~stiefel_peft.fisher.estimators.KfacTraceAccumulator`).

Per-example estimators use one batched backward for causal LMs and sequence classifiers, and
one forward/backward per example (on the model's own loss) for any other head.

With ``process_group`` (data-parallel calibration) every score above is a ratio of sums over
examples, batches or tokens; the sums and the counts are all-reduced (SUM) before the ratios
are taken, so every process gets the scores of the union of all processes' batches.
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stiefel_peft.fisher.blocks import BlockList, find_blocks, resolve_modules
from stiefel_peft.fisher.capture import LinearCapture, frozen_model
from stiefel_peft.fisher.estimators import (
    BatchSquaredAccumulator,
    KfacTraceAccumulator,
    PerExampleAccumulator,
    TaylorAccumulator,
)
from stiefel_peft.fisher.losses import (
    CAUSAL_LM,
    UNKNOWN,
    _unwrap,
    check_against_batch_loss,
    head_kind,
    per_example_losses,
    sample_labels,
)
from stiefel_peft.fisher.scores import FisherScores

__all__ = ["ESTIMATORS", "estimate_fisher"]

ESTIMATORS = ("empirical", "empirical_batch", "sampled", "taylor", "kfac_trace")
_PER_EXAMPLE = ("empirical", "sampled", "kfac_trace")


def _validate(estimator: str, num_samples: int, max_batches: int | None) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; pass one of {list(ESTIMATORS)}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")


def _prepare_batch(batch: Any, device: torch.device, needs_labels: bool, extra: dict) -> dict:
    if not isinstance(batch, Mapping):
        raise ValueError(f"each batch must be a dict of tensors, got {type(batch).__name__}")
    if needs_labels and batch.get("labels") is None:
        raise ValueError(
            "this estimator needs labels: pass batches with a 'labels' tensor (-100 = ignored), "
            "or use estimator='sampled', which draws labels from the model"
        )
    prepared = {key: (value.to(device) if torch.is_tensor(value) else value)
                for key, value in batch.items()}
    if torch.is_tensor(prepared.get("inputs_embeds")):
        prepared["inputs_embeds"] = prepared["inputs_embeds"].detach()
    for key, value in extra.items():
        prepared.setdefault(key, value)
    return prepared


def _batch_size(batch: dict) -> int:
    for key in ("input_ids", "inputs_embeds", "labels"):
        if torch.is_tensor(batch.get(key)):
            return int(batch[key].shape[0])
    raise ValueError("a batch needs an 'input_ids' (or 'inputs_embeds') tensor")


def _example(batch: dict, index: int, batch_size: int) -> dict:
    return {key: (value[index : index + 1]
                  if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch_size
                  else value)
            for key, value in batch.items()}


def _backward(loss: torch.Tensor, capture: LinearCapture, retain_graph: bool = False) -> None:
    if not loss.requires_grad or not capture.leaves:
        raise ValueError("the loss does not depend on any of the scored modules")
    # grad w.r.t. the pre-hook leaves only: no parameter or user tensor gets a .grad
    torch.autograd.grad(loss, capture.leaves, retain_graph=retain_graph, allow_unused=True)


def _forward(model: nn.Module, batch: dict, capture: LinearCapture, accumulator) -> Any:
    capture.clear()
    if isinstance(accumulator, KfacTraceAccumulator):
        accumulator.start_forward()
    accumulator.batch_size = _batch_size(batch)
    tokens = batch.get("input_ids", batch.get("inputs_embeds"))
    has_tokens = torch.is_tensor(tokens) and tokens.dim() > 1
    accumulator.seq_len = int(tokens.shape[1]) if has_tokens else 0
    mask = batch.get("attention_mask")
    accumulator.attention_mask = mask if torch.is_tensor(mask) else None
    return model(**batch)


def _per_example_batch(
    model: nn.Module, batch: dict, capture: LinearCapture, accumulator, kind: str,
    sampling: tuple[int, torch.Generator] | None,
) -> int:
    """Run one batch for a per-example estimator; return the examples counted."""
    labels = batch.get("labels")
    if kind == UNKNOWN:
        if sampling is not None:
            raise ValueError(
                f"estimator='sampled' cannot sample labels for {type(_unwrap(model)).__name__}; "
                "it supports causal LMs and single-label sequence classifiers"
            )
        counted, size = 0, _batch_size(batch)
        for index in range(size):
            outputs = _forward(model, _example(batch, index, size), capture, accumulator)
            if outputs.loss is None or not torch.isfinite(outputs.loss):
                continue  # no labelled token: the example has no loss
            _backward(outputs.loss, capture)
            counted += 1
        return counted
    outputs = _forward(model, batch, capture, accumulator)
    batch_loss = outputs.loss.detach() if outputs.loss is not None else None
    logits = outputs.logits
    del outputs  # frees the model's own loss graph before ours is built
    if labels is not None:
        losses, weights = per_example_losses(kind, logits, labels)
        check_against_batch_loss(losses, weights, batch_loss)
    if sampling is None:
        _backward(losses.sum(), capture)
        return int((weights > 0).sum())
    num_samples, generator = sampling
    counted = 0
    for sample in range(num_samples):
        drawn = sample_labels(kind, logits, labels, generator)
        losses, weights = per_example_losses(kind, logits, drawn)
        _backward(losses.sum(), capture, retain_graph=sample < num_samples - 1)
        counted += int((weights > 0).sum())
    return counted


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    estimator: str = "empirical",
    *,
    modules: Iterable[str] | None = None,
    num_samples: int = 1,
    seed: int = 0,
    max_batches: int | None = None,
    progress: bool = False,
    process_group: dist.ProcessGroup | None = None,
) -> FisherScores:
    """Score every linear layer of ``model`` (see the module docstring for the formulas).

    Args:
        model: a Hugging Face model (or a peft ``PeftModel``) whose output has ``.logits`` and,
            given labels, ``.loss``.
        batches: an iterable (list, DataLoader) of dicts with ``input_ids``, ``attention_mask``,
            ``labels`` (-100 = ignored); other keys are passed to the model unchanged.
        estimator: one of :data:`ESTIMATORS`.
        modules: None for every ``nn.Linear`` inside the transformer blocks
            (:func:`~stiefel_peft.fisher.blocks.find_blocks`), or an iterable of exact
            ``model.named_modules()`` names of ``nn.Linear`` layers.
        num_samples: labels drawn per example (``"sampled"`` only).
        seed: seed of the ``torch.Generator`` used by ``"sampled"``.
        max_batches: read at most this many batches.
        progress: show a tqdm progress bar.
        process_group: None (default) scores this process's batches alone. A process group
            (e.g. ``torch.distributed.group.WORLD``) sums the running sums and the example and
            batch counts over its processes (one all-reduce each) before the scores are
            formed: each process passes its own shard of the calibration data and all get the
            scores of the union (``num_examples`` and ``num_batches`` are then global). Every
            process of the group must call it; ``max_batches`` applies per process.

    Returns:
        :class:`FisherScores`. The model is left as found: parameters, ``requires_grad``,
        ``.grad``, train/eval flags, hooks (also when an exception is raised).

    Raises:
        ValueError: unknown estimator, ``num_samples < 1``, ``max_batches < 1``, no batches,
            a batch without labels (all estimators except ``"sampled"`` on a classifier), bad
            ``modules``, or a model without a block list and no ``modules``.
        RuntimeError: if the per-example losses do not reproduce ``model(**batch).loss``.
    """
    _validate(estimator, num_samples, max_batches)
    if isinstance(batches, (list, tuple)) and not batches:
        raise ValueError("batches is empty; pass at least one batch")
    try:
        blocks: BlockList | None = find_blocks(model)
    except ValueError:
        if modules is None:
            raise
        blocks = None
    targets = resolve_modules(model, modules, blocks)
    device = next(iter(targets.values())).weight.device
    forward_parameters = inspect.signature(_unwrap(model).forward).parameters
    extra = {"use_cache": False} if "use_cache" in forward_parameters else {}
    accumulator = {
        "empirical": PerExampleAccumulator, "sampled": PerExampleAccumulator,
        "kfac_trace": KfacTraceAccumulator, "empirical_batch": BatchSquaredAccumulator,
        "taylor": TaylorAccumulator,
    }[estimator](targets)
    generator = torch.Generator(device=device).manual_seed(seed)
    iterator: Iterable = itertools.islice(batches, max_batches)
    if progress:
        from tqdm.auto import tqdm

        total = len(batches) if hasattr(batches, "__len__") else None
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        iterator = tqdm(iterator, total=total, desc=f"fisher ({estimator})", unit="batch")
    start = time.perf_counter()
    num_batches = num_examples = 0
    kind = None
    with frozen_model(model), LinearCapture(targets, accumulator.on_gradient) as capture:
        for raw_batch in iterator:
            labels = raw_batch.get("labels") if isinstance(raw_batch, Mapping) else None
            kind = head_kind(model, labels) if kind is None else kind
            needs_labels = not (estimator == "sampled" and kind != CAUSAL_LM)
            batch = _prepare_batch(raw_batch, device, needs_labels, extra)
            if estimator in _PER_EXAMPLE:
                sampling = (num_samples, generator) if estimator == "sampled" else None
                num_examples += _per_example_batch(
                    model, batch, capture, accumulator, kind, sampling
                )
            else:
                outputs = _forward(model, batch, capture, accumulator)
                if outputs.loss is None:
                    raise RuntimeError("the model returned no loss for a batch with labels")
                loss = outputs.loss
                del outputs
                _backward(loss, capture)
                num_examples += _batch_size(batch)
            num_batches += 1
            capture.clear()
    if process_group is not None:
        accumulator.all_reduce(process_group)
        num_batches, num_examples = _all_reduce_counts(
            num_batches, num_examples, device, process_group
        )
    if num_batches == 0:
        raise ValueError("batches is empty; pass at least one batch")
    count = num_batches if estimator in ("empirical_batch", "taylor") else num_examples
    if count == 0:
        raise ValueError("no example has a labelled token (every label is -100)")
    per_module = accumulator.finish(count)
    per_block: dict[int, float] = {}
    if blocks is not None:
        for name, score in per_module.items():
            index = blocks.index_of(name)
            if index is not None:
                per_block[index] = per_block.get(index, 0.0) + score
    return FisherScores(
        estimator=estimator,
        per_module=per_module,
        per_block=dict(sorted(per_block.items())),
        num_examples=num_examples,
        num_batches=num_batches,
        seconds=time.perf_counter() - start,
        blocks_path=None if blocks is None else blocks.path,
        num_samples=num_samples if estimator == "sampled" else 1,
        seed=seed,
        metadata={"head": kind} if process_group is None else {
            "head": kind, "processes": dist.get_world_size(process_group)
        },
    )


def _all_reduce_counts(
    num_batches: int, num_examples: int, device: torch.device, process_group: dist.ProcessGroup
) -> tuple[int, int]:
    """The batch and example counts summed over ``process_group`` (one all-reduce)."""
    counts = torch.tensor([num_batches, num_examples], dtype=torch.float64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)
    total_batches, total_examples = (int(value) for value in counts.tolist())
    return total_batches, total_examples
