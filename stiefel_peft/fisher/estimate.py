"""``estimate_fisher``: diagonal-Fisher importance of every linear layer of a transformer.

Notation: ``N`` examples (in ``M`` batches), ``loss_n`` example n's own loss (the value of
``model(**example_n).loss``, see :mod:`stiefel_peft.fisher.losses`),
``L_b = model(**batch_b).loss``, ``theta`` a linear layer's weight and bias. The estimators
(their formulas in :mod:`stiefel_peft.fisher.estimators`, where more can be registered):

- ``"empirical"`` (default): ``(1/N) sum_n ||grad_theta loss_n||^2``, exact;
- ``"empirical_batch"``: ``(1/M) sum_b ||grad_theta L_b||^2``, the official FoRA code's score;
- ``"sampled"``: the Monte Carlo true Fisher, labels drawn from the model;
- ``"taylor"``: ``sum_ij |theta_ij g_ij|`` with ``g = (1/M) sum_b grad_theta L_b``;
- ``"kfac_trace"``: ``tr(A) tr(G)`` of the K-FAC factors.

This module runs the passes each estimator asks for (:attr:`Estimator.loss`): one batched
backward of ``sum_n loss_n`` for causal LMs and sequence classifiers (one forward/backward per
example, on the model's own loss, for any other head), or of the batch loss. Every estimator
counts only what carries a labelled token (an example, or a batch) and raises the same error
when nothing does.

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
from stiefel_peft.fisher.estimators import BATCH, ESTIMATORS, SAMPLED, BatchShape, Estimator
from stiefel_peft.fisher.losses import (
    CAUSAL_LM,
    IGNORE_INDEX,
    UNKNOWN,
    _unwrap,
    check_against_batch_loss,
    head_kind,
    per_example_losses,
    sample_labels,
)
from stiefel_peft.fisher.scores import FisherScores

__all__ = ["ESTIMATORS", "estimate_fisher"]

NO_LABELLED_TOKEN = (
    "no example has a labelled token (every label is -100{shift}): the Fisher scores would be "
    "empty. Label at least one token per example (for a prompt/answer pair, the answer)"
)


def _validate(estimator: str, num_samples: int, max_batches: int | None) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {estimator!r}; pass one of {list(ESTIMATORS)} (or register "
            "one with stiefel_peft.fisher.register_estimator)"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")


def _missing_labels_message(estimator: str, kind: str) -> str:
    if estimator == "sampled":  # only causal LMs need labels here: they mark the positions
        return (
            "estimator='sampled' on a causal LM needs labels to mark the positions to sample "
            "at (-100 elsewhere): pass batches with 'labels', e.g. labels=input_ids to sample "
            "at every position"
        )
    hint = (
        " (labels=input_ids scores every next-token prediction)"
        if kind == CAUSAL_LM
        else "; or use estimator='sampled', which draws the labels from the model"
        if kind != UNKNOWN
        else ""
    )
    return (
        f"estimator={estimator!r} needs labels: pass batches with a 'labels' tensor "
        f"(-100 = ignored){hint}"
    )


def _prepare_batch(
    batch: Any, device: torch.device, estimator: type[Estimator], kind: str, extra: dict
) -> dict:
    if not isinstance(batch, Mapping):
        raise ValueError(f"each batch must be a dict of tensors, got {type(batch).__name__}")
    needs_labels = not (estimator.loss == SAMPLED and kind != CAUSAL_LM)
    if needs_labels and batch.get("labels") is None:
        raise ValueError(_missing_labels_message(estimator.name, kind))
    prepared = {key: (value.to(device) if torch.is_tensor(value) else value)
                for key, value in batch.items()}  # fmt: skip
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
            for key, value in batch.items()}  # fmt: skip


def _has_labelled_token(kind: str, labels: torch.Tensor | None) -> bool:
    """Whether a batch's loss has any term: a causal LM needs a label after the first column."""
    if labels is None:
        return True  # a classifier's labels are sampled, or the model's own loss decides
    if kind == CAUSAL_LM:
        return bool((labels[:, 1:] != IGNORE_INDEX).any())
    return bool((labels != IGNORE_INDEX).any()) if labels.dtype in (torch.long, torch.int) else True


def _backward(loss: torch.Tensor, capture: LinearCapture, retain_graph: bool = False) -> None:
    if not loss.requires_grad or not capture.leaves:
        raise ValueError("the loss does not depend on any of the scored modules")
    # grad w.r.t. the pre-hook leaves only: no parameter or user tensor gets a .grad
    torch.autograd.grad(loss, capture.leaves, retain_graph=retain_graph, allow_unused=True)


def _forward(model: nn.Module, batch: dict, capture: LinearCapture, estimator: Estimator) -> Any:
    capture.clear()
    tokens = batch.get("input_ids", batch.get("inputs_embeds"))
    seq_len = int(tokens.shape[1]) if torch.is_tensor(tokens) and tokens.dim() > 1 else 0
    mask = batch.get("attention_mask")
    estimator.start_batch(
        BatchShape(_batch_size(batch), seq_len, mask if torch.is_tensor(mask) else None)
    )
    try:
        outputs = model(**batch)
    except TypeError as error:
        raise ValueError(
            f"model(**batch) failed ({error}); estimate_fisher calls the model with the "
            f"batch's keys ({sorted(batch)}) as keyword arguments and reads .logits and .loss "
            "of its output, as for Hugging Face models: wrap other models so that they do"
        ) from error
    if not hasattr(outputs, "logits"):
        raise ValueError(
            f"the model returned {type(outputs).__name__}, without .logits; estimate_fisher "
            "reads .logits and .loss of the output, as for Hugging Face models"
        )
    return outputs


def _per_example_batch(
    model: nn.Module, batch: dict, capture: LinearCapture, estimator: Estimator, kind: str,
    sampling: tuple[int, torch.Generator] | None,
) -> int:  # fmt: skip
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
            outputs = _forward(model, _example(batch, index, size), capture, estimator)
            if outputs.loss is None or not torch.isfinite(outputs.loss):
                continue  # no labelled token: the example has no loss
            _backward(outputs.loss, capture)
            counted += 1
        return counted
    outputs = _forward(model, batch, capture, estimator)
    batch_loss = outputs.loss.detach() if outputs.loss is not None else None
    logits = outputs.logits
    del outputs  # frees the model's own loss graph before ours is built
    if labels is not None:
        losses, weights = per_example_losses(kind, logits, labels)
        check_against_batch_loss(losses, weights, batch_loss)
    if sampling is None:
        if int((weights > 0).sum()) == 0:
            return 0  # no labelled token in this batch: nothing to differentiate
        _backward(losses.sum(), capture)
        return int((weights > 0).sum())
    num_samples, generator = sampling
    counted = 0
    for sample in range(num_samples):
        drawn = sample_labels(kind, logits, labels, generator)
        losses, weights = per_example_losses(kind, logits, drawn)
        if int((weights > 0).sum()) == 0:
            continue
        _backward(losses.sum(), capture, retain_graph=sample < num_samples - 1)
        counted += int((weights > 0).sum())
    return counted


def _batch_loss_batch(
    model: nn.Module, batch: dict, capture: LinearCapture, estimator: Estimator, kind: str
) -> int:
    """Run one batch for a batch-loss estimator: 1 if it counted (it has a labelled token)."""
    if not _has_labelled_token(kind, batch.get("labels")):
        return 0
    outputs = _forward(model, batch, capture, estimator)
    if outputs.loss is None:
        raise RuntimeError("the model returned no loss for a batch with labels")
    loss = outputs.loss
    del outputs
    if not torch.isfinite(loss):
        return 0  # the model's own loss has no term (an unknown head with nothing labelled)
    _backward(loss, capture)
    return 1


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
        model: a Hugging Face model (or a peft ``PeftModel``) called as ``model(**batch)``,
            whose output has ``.logits`` and, given labels, ``.loss``.
        batches: an iterable (list, DataLoader) of dicts with ``input_ids``, ``attention_mask``,
            ``labels`` (-100 = ignored); other keys are passed to the model unchanged.
        estimator: a name in :data:`ESTIMATORS`.
        modules: None for every linear layer (``nn.Linear`` or transformers ``Conv1D``)
            inside the transformer blocks (:func:`~stiefel_peft.fisher.blocks.find_blocks`),
            or an iterable of exact ``model.named_modules()`` names of linear layers.
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
            a batch without labels (every estimator except ``"sampled"`` on a classifier), no
            labelled token in any batch (every estimator alike), bad ``modules``, a model
            without a block list and no ``modules``, a model that cannot be called as
            ``model(**batch)``, or ``"taylor"`` on a packed (quantized) layer.
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
    device = next(next(iter(targets.values())).parameters()).device
    forward_parameters = inspect.signature(_unwrap(model).forward).parameters
    extra = {"use_cache": False} if "use_cache" in forward_parameters else {}
    estimator_class = ESTIMATORS[estimator]
    accumulator = estimator_class(targets)
    generator = torch.Generator(device=device).manual_seed(seed)
    iterator: Iterable = itertools.islice(batches, max_batches)
    if progress:
        from tqdm.auto import tqdm

        total = len(batches) if hasattr(batches, "__len__") else None
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        iterator = tqdm(iterator, total=total, desc=f"fisher ({estimator})", unit="batch")
    start = time.perf_counter()
    num_batches = num_examples = counted = 0
    kind = None
    with frozen_model(model), LinearCapture(targets, accumulator.on_gradient) as capture:
        for raw_batch in iterator:
            labels = raw_batch.get("labels") if isinstance(raw_batch, Mapping) else None
            kind = head_kind(model, labels) if kind is None else kind
            batch = _prepare_batch(raw_batch, device, estimator_class, kind, extra)
            if estimator_class.loss == BATCH:
                used = _batch_loss_batch(model, batch, capture, accumulator, kind)
                counted += used
                num_examples += _batch_size(batch) if used else 0
            else:
                sampling = (num_samples, generator) if estimator_class.loss == SAMPLED else None
                used = _per_example_batch(model, batch, capture, accumulator, kind, sampling)
                counted += used
                num_examples += used
            num_batches += 1
            capture.clear()
    if process_group is not None:
        accumulator.all_reduce(process_group)
        num_batches, num_examples, counted = _all_reduce_counts(
            [num_batches, num_examples, counted], device, process_group
        )
    if num_batches == 0:
        raise ValueError("batches is empty; pass at least one batch")
    if counted == 0:
        shift = ", or only in the first column of a causal LM's" if kind == CAUSAL_LM else ""
        raise ValueError(NO_LABELLED_TOKEN.format(shift=shift))
    per_module = accumulator.finish(counted)
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
        num_samples=num_samples if estimator_class.loss == SAMPLED else 1,
        seed=seed,
        metadata={"head": kind}
        if process_group is None
        else {"head": kind, "processes": dist.get_world_size(process_group)},
    )


def _all_reduce_counts(
    counts: list[int], device: torch.device, process_group: dist.ProcessGroup
) -> list[int]:
    """The counts summed over ``process_group`` (one all-reduce)."""
    values = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=process_group)
    return [int(value) for value in values.tolist()]
