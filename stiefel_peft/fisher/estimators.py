"""The Fisher estimators, one class each, in a registry (:data:`ESTIMATORS`).

An estimator says which loss its backward pass differentiates (:attr:`Estimator.loss`: each
example's own loss, the batch loss, or labels drawn from the model), receives during that
backward each scored layer's input ``x`` ``(B, ..., d_in)`` and output gradient ``delta``
``(B, ..., d_out)`` (see :class:`~stiefel_peft.fisher.capture.LinearCapture`), keeps running
sums, and turns them into one score per module. :func:`~stiefel_peft.fisher.estimate_fisher`
runs the passes; a researcher adds an estimator with :func:`register_estimator` and never
edits it::

    @register_estimator("my_score")
    class MyScore(Estimator):
        loss = PER_EXAMPLE
        def on_gradient(self, name, x, delta): ...
        def running_sums(self): ...
        def finish(self, count): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from stiefel_peft.fisher.blocks import dense_weight
from stiefel_peft.fisher.norms import squared_gradient_norms, token_squared_norms

__all__ = [
    "BATCH",
    "ESTIMATORS",
    "PER_EXAMPLE",
    "SAMPLED",
    "BatchShape",
    "Estimator",
    "register_estimator",
]

PER_EXAMPLE = "per_example"  # backward of sum_n loss_n: row n of delta is example n's gradient
SAMPLED = "sampled"  # the same, with labels drawn from the model's predictive distribution
BATCH = "batch"  # backward of the batch loss model(**batch).loss
LOSSES = (PER_EXAMPLE, SAMPLED, BATCH)


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class BatchShape:
    """What an estimator may know of the current batch: its size, sequence length and mask."""

    def __init__(
        self, batch_size: int, seq_len: int, attention_mask: torch.Tensor | None = None
    ) -> None:
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.attention_mask = attention_mask

    def grouped(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        """``(B, ..., d) -> (B, T, d)``, the tokens of each example in one row.

        A layer fed with tokens flattened batch-major, ``(B * seq_len, d)`` (OPT's MLP does
        ``hidden.reshape(-1, d)``), is regrouped the same way; any other leading size raises.
        """
        if (
            tensor.dim() == 2
            and self.seq_len > 0
            and tensor.shape[0] == self.batch_size * self.seq_len
        ):
            return tensor.reshape(self.batch_size, self.seq_len, tensor.shape[-1])  # (B, T, d)
        if tensor.dim() < 2 or tensor.shape[0] != self.batch_size:
            raise ValueError(
                f"module {name!r} saw a tensor of shape {tuple(tensor.shape)} whose first "
                f"dimension is not the batch size {self.batch_size}: its tokens cannot be "
                "assigned to examples; leave it out of modules="
            )
        return tensor.reshape(self.batch_size, -1, tensor.shape[-1])  # (B, T, d)


class Estimator:
    """Base class of the estimators: running sums over ``(x, delta)`` pairs, then scores.

    Class attributes a subclass sets:
        loss: :data:`PER_EXAMPLE`, :data:`SAMPLED` or :data:`BATCH` (which backward feeds it).
        count: ``"examples"`` or ``"batches"``: what :meth:`finish` divides by.

    Hooks: :meth:`start_batch` (before each forward), :meth:`on_gradient` (during backward),
    :meth:`running_sums` (the tensors :meth:`all_reduce` sums over processes, in an order
    that is the same on every process), :meth:`finish` (the scores).
    """

    name: ClassVar[str] = ""
    loss: ClassVar[str] = PER_EXAMPLE
    count: ClassVar[str] = "examples"

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.shape = BatchShape(0, 0)

    def start_batch(self, shape: BatchShape) -> None:
        """Called before each forward pass with the batch's shape."""
        self.shape = shape

    def on_gradient(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        raise NotImplementedError

    def running_sums(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def finish(self, count: int) -> dict[str, float]:
        raise NotImplementedError

    def _zero(self, module: nn.Module) -> torch.Tensor:
        device = next(module.parameters()).device
        return torch.zeros((), dtype=_accumulator_dtype(device), device=device)

    def all_reduce(self, process_group: dist.ProcessGroup | None) -> None:
        """Sum :meth:`running_sums` over the processes of ``process_group``, in place.

        One ``all_reduce(SUM)`` of their concatenation (float64, on the modules' device).
        Afterwards :meth:`finish` with the global count gives the score of the union of the
        processes' batches. Every process must call it.
        """
        sums = self.running_sums()
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in sums])  # one buffer
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
        for total, piece in zip(sums, flat.split([t.numel() for t in sums]), strict=True):
            total.copy_(piece.view(total.shape))


ESTIMATORS: dict[str, type[Estimator]] = {}


def register_estimator(
    name: str, *, replace: bool = False
) -> Callable[[type[Estimator]], type[Estimator]]:
    """Class decorator that adds an :class:`Estimator` subclass to :data:`ESTIMATORS`.

    Every consumer (``estimate_fisher``, ``FoRAConfig(estimator=...)``, the CLI) then accepts
    ``name``.

    Raises:
        ValueError: ``name`` is empty or taken (without ``replace``), or the class is not an
            Estimator with a known ``loss`` and ``count``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    if name in ESTIMATORS and not replace:
        raise ValueError(
            f"an estimator named {name!r} is already registered; pick another name or pass "
            "`replace=True`"
        )

    def decorator(cls: type[Estimator]) -> type[Estimator]:
        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise ValueError(f"register_estimator decorates Estimator subclasses, got {cls!r}")
        if cls.loss not in LOSSES or cls.count not in ("examples", "batches"):
            raise ValueError(
                f"{cls.__name__}.loss must be one of {LOSSES} and .count 'examples' or "
                f"'batches', got {cls.loss!r} and {cls.count!r}"
            )
        cls.name = name
        ESTIMATORS[name] = cls
        return cls

    return decorator


class _SquaredNorms(Estimator):
    """``sum_groups ||grad_W||^2 + ||grad_b||^2`` per module; subclasses choose the groups."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__(modules)
        self.sums = {name: self._zero(module) for name, module in modules.items()}

    def groups(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def on_gradient(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        bias = getattr(self.modules[name], "bias", None) is not None
        weight, bias_norms = squared_gradient_norms(
            self.groups(x, name), self.groups(delta, name), bias=bias
        )
        self.sums[name] += (weight + bias_norms).sum().to(self.sums[name].dtype)

    def running_sums(self) -> list[torch.Tensor]:
        return list(self.sums.values())

    def finish(self, count: int) -> dict[str, float]:
        return {name: float(total) / count for name, total in self.sums.items()}


@register_estimator("empirical")
class EmpiricalFisher(_SquaredNorms):
    """``(1/N) sum_n ||grad_theta loss_n||^2``, exact, per example (the paper's score).

    From one batched backward of ``sum_n loss_n`` and the layers' inputs and output gradients
    (:mod:`stiefel_peft.fisher.norms`); no weight gradient is ever formed.
    """

    loss = PER_EXAMPLE

    def groups(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return self.shape.grouped(tensor, name)  # (B, T, d): one group per example


@register_estimator("sampled")
class SampledFisher(EmpiricalFisher):
    """``(1/(N S)) sum_n sum_s ||grad_theta loss_n(y_{n,s})||^2`` with ``y ~ p_theta(y | x_n)``:
    the Monte Carlo estimate of the true Fisher (S = ``num_samples``)."""

    loss = SAMPLED


@register_estimator("empirical_batch")
class BatchSquaredFisher(_SquaredNorms):
    """``(1/M) sum_b ||grad_theta L_b||^2`` for the batch losses ``L_b``, the official FoRA
    code's score; it estimates ``||mean gradient||^2 + variance / B`` (depends on B)."""

    loss = BATCH
    count = "batches"

    def groups(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor.reshape(1, -1, tensor.shape[-1])  # (1, B*T, d): one group, all tokens


@register_estimator("taylor")
class TaylorScore(Estimator):
    """``sum_ij |W_ij g_ij| + sum_i |b_i g_i|`` with ``g = (1/M) sum_b grad L_b``.

    Keeps a weight-sized running gradient (float32, float64 for float64 layers), so it needs
    a plain dense weight: a packed (quantized) layer raises at construction.
    """

    loss = BATCH
    count = "batches"

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__(modules)
        self.weights = {
            name: dense_weight(module, name, "taylor") for name, module in modules.items()
        }
        self.weight_grads: dict[str, torch.Tensor] = {}
        self.bias_grads: dict[str, torch.Tensor] = {}

    def _dtype(self, name: str) -> torch.dtype:
        return torch.float64 if self.weights[name].dtype == torch.float64 else torch.float32

    def on_gradient(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        dtype = self._dtype(name)
        x_all = x.reshape(-1, x.shape[-1]).to(dtype)  # (B*T, d_in)
        delta_all = delta.reshape(-1, delta.shape[-1]).to(dtype)  # (B*T, d_out)
        weight_grad = delta_all.T @ x_all  # (d_out, d_in): sum over every token of the batch
        if name in self.weight_grads:
            self.weight_grads[name] += weight_grad
        else:
            self.weight_grads[name] = weight_grad
        if getattr(self.modules[name], "bias", None) is not None:
            bias_grad = delta_all.sum(dim=0)  # (d_out,)
            self.bias_grads[name] = self.bias_grads.get(name, 0) + bias_grad

    def running_sums(self) -> list[torch.Tensor]:
        # a process that saw no batch has no sums yet: zeros keep every process's list aligned
        sums = []
        for name, module in self.modules.items():
            weight = self.weights[name]
            if name not in self.weight_grads:
                self.weight_grads[name] = weight.new_zeros(weight.shape, dtype=self._dtype(name))
            sums.append(self.weight_grads[name])
            bias = getattr(module, "bias", None)
            if bias is not None:
                if not torch.is_tensor(self.bias_grads.get(name)):
                    self.bias_grads[name] = bias.new_zeros(bias.shape, dtype=self._dtype(name))
                sums.append(self.bias_grads[name])
        return sums

    def finish(self, count: int) -> dict[str, float]:
        scores = {}
        for name, module in self.modules.items():
            if name not in self.weight_grads:
                scores[name] = 0.0
                continue
            weight = self.weights[name].detach().to(self.weight_grads[name].dtype)
            score = (weight * self.weight_grads[name]).abs().sum() / count
            bias = getattr(module, "bias", None)
            if bias is not None:
                bias_values = bias.detach().to(self.bias_grads[name].dtype)
                score = score + (bias_values * self.bias_grads[name]).abs().sum() / count
            scores[name] = float(score)
        return scores


@register_estimator("kfac_trace")
class KfacTrace(Estimator):
    """Token sums for ``tr(A) tr(G)``.

    ``A = (1/|V|) sum_{(n,t) in V} x~ x~^T`` over the valid tokens V (``attention_mask == 1``
    when its shape matches the layer's token grid, else all tokens), with ``x~ = [x, 1]`` when
    the layer has a bias; ``G = (1/N) sum_n sum_t delta_{n,t} delta_{n,t}^T`` with ``delta``
    from the per-example losses. So ``tr(A) = mean_V ||x~||^2`` and
    ``tr(G) = (1/N) sum_{n,t} ||delta_{n,t}||^2``. ``A`` is accumulated once per forward.
    """

    loss = PER_EXAMPLE

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__(modules)
        self.input_sums = {name: self._zero(module) for name, module in modules.items()}
        self.token_counts = {name: self._zero(module) for name, module in modules.items()}
        self.gradient_sums = {name: self._zero(module) for name, module in modules.items()}
        self._seen_forward: set[str] = set()

    def start_batch(self, shape: BatchShape) -> None:
        super().start_batch(shape)
        self._seen_forward.clear()  # a new forward: its inputs are counted once

    def on_gradient(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        grouped_delta = self.shape.grouped(delta, name)  # (B, T, d_out)
        self.gradient_sums[name] += (
            token_squared_norms(grouped_delta).sum().to(self.gradient_sums[name].dtype)
        )
        if name in self._seen_forward:
            return
        self._seen_forward.add(name)
        input_norms = token_squared_norms(self.shape.grouped(x, name))  # (B, T) one per token
        if getattr(self.modules[name], "bias", None) is not None:
            input_norms = input_norms + 1  # the bias column of x~ = [x, 1]
        mask = self.shape.attention_mask
        if mask is not None and tuple(mask.shape) == tuple(input_norms.shape):
            valid = mask.to(input_norms.dtype)
        else:
            valid = torch.ones_like(input_norms)
        self.input_sums[name] += (input_norms * valid).sum().to(self.input_sums[name].dtype)
        self.token_counts[name] += valid.sum().to(self.token_counts[name].dtype)

    def running_sums(self) -> list[torch.Tensor]:
        sums = (self.input_sums, self.token_counts, self.gradient_sums)
        return [total for per_module in sums for total in per_module.values()]

    def finish(self, count: int) -> dict[str, float]:
        scores = {}
        for name in self.modules:
            tokens = float(self.token_counts[name])
            trace_a = float(self.input_sums[name]) / tokens if tokens > 0 else 0.0
            trace_g = float(self.gradient_sums[name]) / count
            scores[name] = trace_a * trace_g
        return scores
