"""The per-estimator accumulators: what each estimator does with one layer's ``(x, delta)``.

Each accumulator receives, during backward, a layer's input ``x`` ``(B, ..., d_in)`` and output
gradient ``delta`` ``(B, ..., d_out)`` (see :class:`~stiefel_peft.fisher.capture.LinearCapture`),
adds to running sums, and turns them into one score per module at the end. Which loss the
``delta`` belongs to (per-example losses, the batch loss, sampled labels) is decided by the
caller in :mod:`stiefel_peft.fisher.estimate`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from stiefel_peft.fisher.norms import squared_gradient_norms, token_squared_norms

__all__ = [
    "BatchSquaredAccumulator",
    "KfacTraceAccumulator",
    "PerExampleAccumulator",
    "TaylorAccumulator",
]


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _grouped(tensor: torch.Tensor, batch_size: int, seq_len: int, name: str) -> torch.Tensor:
    """``(B, ..., d) -> (B, T, d)``, the tokens of each example in one row.

    A layer fed with tokens flattened batch-major, ``(B * seq_len, d)`` (OPT's MLP does
    ``hidden.reshape(-1, d)``), is regrouped the same way; any other leading size raises.
    """
    if tensor.dim() == 2 and seq_len > 0 and tensor.shape[0] == batch_size * seq_len:
        return tensor.reshape(batch_size, seq_len, tensor.shape[-1])  # (B*T, d) -> (B, T, d)
    if tensor.dim() < 2 or tensor.shape[0] != batch_size:
        raise ValueError(
            f"module {name!r} saw a tensor of shape {tuple(tensor.shape)} whose first dimension "
            f"is not the batch size {batch_size}: its tokens cannot be assigned to examples; "
            "leave it out of modules="
        )
    return tensor.reshape(batch_size, -1, tensor.shape[-1])  # (B, T, d)


class _Accumulator:
    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.modules = modules
        self.batch_size = 0
        self.seq_len = 0
        self.attention_mask: torch.Tensor | None = None

    def _grouped(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return _grouped(tensor, self.batch_size, self.seq_len, name)

    def _zero(self, module: nn.Linear) -> torch.Tensor:
        device = module.weight.device
        return torch.zeros((), dtype=_accumulator_dtype(device), device=device)

    def running_sums(self) -> list[torch.Tensor]:
        """The running sums, in an order fixed by ``modules`` (the same on every process)."""
        raise NotImplementedError

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


class PerExampleAccumulator(_Accumulator):
    """``sum_n ||grad_W loss_n||^2 + ||grad_b loss_n||^2`` per module (empirical, sampled).

    ``delta`` must come from the backward of ``sum_n loss_n``, so that row n of ``delta`` is
    the output gradient of example n's own loss. ``finish(count)`` divides by ``count``.
    """

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        super().__init__(modules)
        self.sums = {name: self._zero(module) for name, module in modules.items()}

    def on_gradient(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        bias = self.modules[name].bias is not None
        weight, bias_norms = squared_gradient_norms(
            self._grouped(x, name), self._grouped(delta, name), bias=bias
        )
        self.sums[name] += (weight + bias_norms).sum().to(self.sums[name].dtype)

    def running_sums(self) -> list[torch.Tensor]:
        return list(self.sums.values())

    def finish(self, count: int) -> dict[str, float]:
        return {name: float(total) / count for name, total in self.sums.items()}


class BatchSquaredAccumulator(_Accumulator):
    """``sum_b ||grad_W L_b||^2 + ||grad_b L_b||^2`` for the batch losses ``L_b``.

    Every token of the batch is one group: ``grad_W L_b = sum_{n,t} delta_{n,t} x_{n,t}^T``.
    """

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        super().__init__(modules)
        self.sums = {name: self._zero(module) for name, module in modules.items()}

    def on_gradient(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        bias = self.modules[name].bias is not None
        x_all = x.reshape(1, -1, x.shape[-1])  # (1, B*T, d_in): one group, all tokens
        delta_all = delta.reshape(1, -1, delta.shape[-1])  # (1, B*T, d_out)
        weight, bias_norms = squared_gradient_norms(x_all, delta_all, bias=bias)
        self.sums[name] += (weight + bias_norms).sum().to(self.sums[name].dtype)

    def running_sums(self) -> list[torch.Tensor]:
        return list(self.sums.values())

    def finish(self, count: int) -> dict[str, float]:
        return {name: float(total) / count for name, total in self.sums.items()}


class TaylorAccumulator(_Accumulator):
    """Running ``sum_b grad_W L_b`` (weight-sized, fp32 or fp64) for the Taylor score.

    ``finish(count)`` returns ``sum_ij |W_ij g_ij| + sum_i |b_i g_i|`` with
    ``g = (1/count) sum_b grad L_b``.
    """

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        super().__init__(modules)
        self.weight_grads: dict[str, torch.Tensor] = {}
        self.bias_grads: dict[str, torch.Tensor] = {}

    def on_gradient(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x_all = x.reshape(-1, x.shape[-1]).to(dtype)  # (B*T, d_in)
        delta_all = delta.reshape(-1, delta.shape[-1]).to(dtype)  # (B*T, d_out)
        weight_grad = delta_all.T @ x_all  # (d_out, d_in): sum over every token of the batch
        if name in self.weight_grads:
            self.weight_grads[name] += weight_grad
        else:
            self.weight_grads[name] = weight_grad
        if self.modules[name].bias is not None:
            bias_grad = delta_all.sum(dim=0)  # (d_out,)
            self.bias_grads[name] = self.bias_grads.get(name, 0) + bias_grad

    def running_sums(self) -> list[torch.Tensor]:
        # a process that saw no batch has no sums yet: zeros keep every process's list aligned
        sums = []
        for name, module in self.modules.items():
            dtype = torch.float64 if module.weight.dtype == torch.float64 else torch.float32
            if name not in self.weight_grads:
                self.weight_grads[name] = module.weight.new_zeros(module.weight.shape, dtype=dtype)
            sums.append(self.weight_grads[name])
            if module.bias is not None:
                if not torch.is_tensor(self.bias_grads.get(name)):
                    self.bias_grads[name] = module.bias.new_zeros(module.bias.shape, dtype=dtype)
                sums.append(self.bias_grads[name])
        return sums

    def finish(self, count: int) -> dict[str, float]:
        scores = {}
        for name, module in self.modules.items():
            if name not in self.weight_grads:
                scores[name] = 0.0
                continue
            weight = module.weight.detach().to(self.weight_grads[name].dtype)
            score = (weight * self.weight_grads[name]).abs().sum() / count
            if module.bias is not None:
                bias = module.bias.detach().to(self.bias_grads[name].dtype)
                score = score + (bias * self.bias_grads[name]).abs().sum() / count
            scores[name] = float(score)
        return scores


class KfacTraceAccumulator(_Accumulator):
    """Token sums for ``tr(A) tr(G)``.

    ``A = (1/|V|) sum_{(n,t) in V} x~ x~^T`` over the valid tokens V (``attention_mask == 1``
    when its shape matches the layer's token grid, else all tokens), with ``x~ = [x, 1]`` when
    the layer has a bias; ``G = (1/N) sum_n sum_t delta_{n,t} delta_{n,t}^T`` with ``delta``
    from the per-example losses. So ``tr(A) = mean_V ||x~||^2`` and
    ``tr(G) = (1/N) sum_{n,t} ||delta_{n,t}||^2``.
    """

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        super().__init__(modules)
        self.input_sums = {name: self._zero(module) for name, module in modules.items()}
        self.token_counts = {name: self._zero(module) for name, module in modules.items()}
        self.gradient_sums = {name: self._zero(module) for name, module in modules.items()}
        self._seen_forward: set[str] = set()

    def start_forward(self) -> None:
        """Call before each forward: A is accumulated once per forward, not per backward."""
        self._seen_forward.clear()

    def on_gradient(self, name: str, x: torch.Tensor, delta: torch.Tensor) -> None:
        grouped_delta = self._grouped(delta, name)  # (B, T, d_out)
        self.gradient_sums[name] += token_squared_norms(grouped_delta).sum().to(
            self.gradient_sums[name].dtype
        )
        if name in self._seen_forward:
            return
        self._seen_forward.add(name)
        input_norms = token_squared_norms(self._grouped(x, name))  # (B, T) one value per token
        if self.modules[name].bias is not None:
            input_norms = input_norms + 1  # the bias column of x~ = [x, 1]
        mask = self.attention_mask
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
