"""Hooks that hand each linear layer's input and output gradient to a callback.

Memory stays at activation level: no parameter requires grad while the hooks are active, so
autograd never forms a weight gradient. Instead a forward *pre*-hook makes a layer's input a
fresh leaf that requires grad when it does not already (the first layers, fed by the frozen
embeddings), which makes the layer's output require grad; a tensor hook on that output receives
``delta = dL/dy`` during backward and calls ``on_gradient(name, x, delta)``. The inputs ``x``
are the very tensors the forward used (no copies).

:func:`frozen_model` leaves the model exactly as found: per-parameter ``requires_grad``,
per-module ``training`` flags, ``config.problem_type``; ``.grad`` is never written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["LinearCapture", "frozen_model"]

GradientCallback = Callable[[str, torch.Tensor, torch.Tensor], None]


@contextmanager
def frozen_model(model: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter requiring grad, grad mode on; everything restored on exit.

    Restores each parameter's ``requires_grad``, each submodule's ``training`` flag and the
    config's ``problem_type`` (Hugging Face classifiers set it on their first forward), also
    when the body raises.
    """
    requires_grad = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    training = [(module, module.training) for module in model.modules()]
    config = getattr(model, "config", None)
    problem_type = getattr(config, "problem_type", None)
    try:
        for parameter, _ in requires_grad:
            parameter.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)
        for module, flag in training:
            module.training = flag
        if config is not None and hasattr(config, "problem_type"):
            config.problem_type = problem_type


class LinearCapture:
    """Context manager: calls ``on_gradient(name, x, delta)`` for each captured layer.

    ``x`` has shape ``(B, ..., d_in)`` and ``delta`` ``(B, ..., d_out)`` exactly as the layer saw
    them. A layer called twice in one forward (weight sharing) raises ``ValueError``, since its
    per-example gradient would mix both calls. Inputs are kept until :meth:`clear` (so several
    backward passes through one graph, as the sampled Fisher does, all see them).

    Attributes:
        leaves: the input leaves created by the pre-hooks (pass them to ``torch.autograd.grad``
            as ``inputs`` so that nothing else accumulates a gradient).
    """

    def __init__(self, modules: dict[str, nn.Linear], on_gradient: GradientCallback) -> None:
        self.modules = modules
        self.on_gradient = on_gradient
        self.inputs: dict[str, torch.Tensor] = {}
        self.leaves: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> LinearCapture:
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
                self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook and drop the stored inputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        """Drop the inputs and leaves of the last forward (call before the next forward)."""
        self.inputs.clear()
        self.leaves.clear()

    def _pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if name in self.inputs:
                raise ValueError(
                    f"module {name!r} was called twice in one forward (shared weights); "
                    "its per-example gradient cannot be captured; leave it out of modules="
                )
            x = args[0]
            if x.requires_grad:
                return None
            leaf = x.detach().requires_grad_(True)
            self.leaves.append(leaf)
            return (leaf, *args[1:])

        return hook

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            self.inputs[name] = x.detach()

            def on_output_grad(delta: torch.Tensor) -> None:
                self.on_gradient(name, self.inputs[name], delta)

            output.register_hook(on_output_grad)

        return hook
