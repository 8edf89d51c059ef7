"""Dense float64 brute-force references for the Fisher estimators (slow, obviously correct).

Every reference works from ``model(**example).loss`` (or the batch loss) and autograd weight
gradients: no hooks, no per-example tricks.
"""

from __future__ import annotations

import torch
from torch import nn

from stiefel_peft.fisher.blocks import linear_modules


def example(batch: dict, index: int) -> dict:
    """Row ``index`` of every tensor in ``batch``, keeping the batch dimension."""
    return {key: value[index : index + 1] for key, value in batch.items()}


def _parameters(modules: dict[str, nn.Linear]) -> list[tuple[str, torch.Tensor]]:
    pairs = []
    for name, module in modules.items():
        pairs.append((name, module.weight))
        if module.bias is not None:
            pairs.append((name, module.bias))
    return pairs


def _squared_gradient_norms(loss: torch.Tensor, modules: dict[str, nn.Linear]) -> dict[str, float]:
    pairs = _parameters(modules)
    grads = torch.autograd.grad(loss, [p for _, p in pairs], allow_unused=True)
    norms = dict.fromkeys(modules, 0.0)
    for (name, _), grad in zip(pairs, grads, strict=True):
        if grad is not None:
            norms[name] += float(grad.square().sum())
    return norms


def _with_grads(model: nn.Module):
    for parameter in model.parameters():
        parameter.requires_grad_(True)


def empirical(model: nn.Module, batches: list[dict], modules=None) -> dict[str, float]:
    """``(1/N) sum_n ||grad model(**example_n).loss||^2``; examples with no label are skipped."""
    modules = modules or linear_modules(model)
    _with_grads(model)
    totals, count = dict.fromkeys(modules, 0.0), 0
    for batch in batches:
        for index in range(batch["input_ids"].shape[0]):
            loss = model(**example(batch, index)).loss
            if not torch.isfinite(loss):
                continue
            for name, value in _squared_gradient_norms(loss, modules).items():
                totals[name] += value
            count += 1
    return {name: value / count for name, value in totals.items()}


def empirical_batch(model: nn.Module, batches: list[dict]) -> dict[str, float]:
    """``(1/M) sum_b ||grad model(**batch_b).loss||^2``."""
    modules = linear_modules(model)
    _with_grads(model)
    totals = dict.fromkeys(modules, 0.0)
    for batch in batches:
        for name, value in _squared_gradient_norms(model(**batch).loss, modules).items():
            totals[name] += value
    return {name: value / len(batches) for name, value in totals.items()}


def taylor(model: nn.Module, batches: list[dict]) -> dict[str, float]:
    """``sum |theta * g|`` with ``g`` the mean over batches of the batch-loss gradient."""
    modules = linear_modules(model)
    _with_grads(model)
    pairs = _parameters(modules)
    means = [torch.zeros_like(p) for _, p in pairs]
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, [p for _, p in pairs])
        for mean, grad in zip(means, grads, strict=True):
            mean += grad / len(batches)
    scores = dict.fromkeys(modules, 0.0)
    for (name, parameter), mean in zip(pairs, means, strict=True):
        scores[name] += float((parameter.detach() * mean).abs().sum())
    return scores


def kfac_trace(model: nn.Module, batches: list[dict]) -> dict[str, float]:
    """``tr(A) tr(G)`` from explicit matrices built one example at a time.

    ``A = mean over tokens with attention_mask 1 of [x, 1][x, 1]^T`` (the 1 only with a bias),
    ``G = (1/N) sum_n sum_t delta delta^T`` with ``delta = d loss_n / d output`` by autograd.
    """
    modules = linear_modules(model)
    a_sums = {name: 0.0 for name in modules}
    a_counts = dict.fromkeys(modules, 0.0)
    g_sums = {name: 0.0 for name in modules}
    count = 0
    for batch in batches:
        for index in range(batch["input_ids"].shape[0]):
            single = example(batch, index)
            captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            handles = []
            for name, module in modules.items():

                def hook(module, args, output, name=name, captured=captured):
                    output.retain_grad()
                    captured[name] = (args[0].detach(), output)

                handles.append(module.register_forward_hook(hook))
            try:
                _with_grads(model)
                loss = model(**single).loss
                loss.backward()
            finally:
                for handle in handles:
                    handle.remove()
                model.zero_grad(set_to_none=True)
            count += 1
            mask = single["attention_mask"].reshape(-1).bool()
            for name, (x, output) in captured.items():
                x = x.reshape(-1, x.shape[-1])[mask]  # (valid tokens, d_in)
                if modules[name].bias is not None:
                    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
                a_matrix = x.T @ x  # (d_in, d_in), summed over valid tokens
                delta = output.grad.reshape(-1, output.shape[-1])  # (T, d_out)
                g_matrix = delta.T @ delta  # (d_out, d_out)
                a_sums[name] += float(torch.trace(a_matrix))
                a_counts[name] += x.shape[0]
                g_sums[name] += float(torch.trace(g_matrix))
    return {name: (a_sums[name] / a_counts[name]) * (g_sums[name] / count) for name in modules}


def sample_like_the_model(
    logits: torch.Tensor, labels: torch.Tensor | None, causal: bool, generator: torch.Generator
) -> torch.Tensor:
    """Labels drawn from ``softmax(logits)``, written independently of the library.

    The documented protocol: a causal LM draws at every position ``t`` whose *next* label
    ``labels[n, t + 1]`` is not -100, in row-major order, with one ``torch.multinomial`` call on
    the float64 probabilities of those positions, and writes the draw to ``t + 1``; a
    classifier draws one class per example.
    """
    if not causal:
        probabilities = torch.softmax(logits.double(), dim=-1)  # (B, C)
        return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
    rows, columns = [], []
    for n in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if int(labels[n, t + 1]) != -100:
                rows.append(n)
                columns.append(t)
    drawn = torch.full_like(labels, -100)
    if rows:
        picked = torch.stack([logits[n, t] for n, t in zip(rows, columns, strict=True)])
        probabilities = torch.softmax(picked.double(), dim=-1)  # (P, V)
        values = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
        for (n, t), value in zip(zip(rows, columns, strict=True), values.tolist(), strict=True):
            drawn[n, t + 1] = value
    return drawn
