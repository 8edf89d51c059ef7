"""Buckets: same-shape Stiefel parameters stacked so that one batched kernel steps them all.

A bucket holds the parameters of one param group that share the frame shape ``(n, p)`` (after
transposing wide matrices, so ``n >= p``), the dtype and the device. Its optimizer state lives
in stacked ``(f, ...)`` tensors (``f`` = total number of frames: a ``(..., n, p)`` parameter
contributes ``prod(...)`` frames); ``optimizer.state[param]`` holds views into them, so the
ordinary ``state_dict()`` sees per-parameter tensors and a loaded state is re-stacked lazily.

Layout of the per-parameter views: the *tall* orientation, i.e. ``(..., n, p)`` for a tall
parameter and ``(..., cols, rows)`` (its transpose) for a wide one; a per-matrix scalar has
shape ``(..., 1, 1)`` and a per-matrix p x p state ``(..., p, p)``. Half-precision
parameters keep a float32 ``"master"`` copy of the frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FRAME = "frame"  # a state tensor shaped like the (oriented) parameter
SCALAR = "scalar"  # one value per (n, p) frame
SQUARE = "square"  # one (p, p) matrix per frame
HALF_DTYPES = (torch.float16, torch.bfloat16)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the step math runs in: float32 for half parameters, the dtype otherwise."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def oriented(param: torch.Tensor) -> torch.Tensor:
    """The tall view of a parameter: itself if ``rows >= cols``, else its transpose ``.mT``."""
    return param if param.shape[-2] >= param.shape[-1] else param.mT


def is_distributed_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (imported only when needed)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor  # deferred: optim must not need distributed

    return isinstance(tensor, DTensor)


def oriented_local(param: torch.Tensor) -> torch.Tensor:
    """:func:`oriented`, but of the values this process holds (the local shard of a DTensor).

    The orientation follows the *global* shape: a tall ``(n, p)`` DTensor sharded along ``n``
    gives its local ``(n_local, p)`` rows even where ``n_local < p``. For a plain tensor this is
    :func:`oriented`. The view aliases the parameter, so in-place writes reach it.
    """
    values = param.to_local() if is_distributed_tensor(param) else param
    return values if param.shape[-2] >= param.shape[-1] else values.mT


def frame_shape(param: torch.Tensor) -> tuple[int, int]:
    """``(n, p)`` with ``n >= p`` of a ``(..., rows, cols)`` parameter."""
    rows, cols = param.shape[-2], param.shape[-1]
    return (max(rows, cols), min(rows, cols))


@dataclass(eq=False)
class Bucket:
    """Stacked state of the same-shape Stiefel parameters of one param group.

    ``shape`` is the ``(n, p)`` of the values stacked here: for DTensor parameters (only accepted
    by a shard-aware subclass, see :mod:`stiefel_peft.distributed`) the local shard's.
    """

    group_index: int
    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    params: list[torch.Tensor]
    frames: list[int]
    steps_host: list[int]
    steps: torch.Tensor
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    master: torch.Tensor | None = None
    # persistent stacked buffers (plain tensors only, see :meth:`bind`); None: stack every step
    storage: torch.Tensor | None = None  # (f, n, p) parameter dtype; tall params' .data views
    grad_buffer: torch.Tensor | None = None  # (f, n, p) working dtype, refilled every step
    views: list[torch.Tensor] = field(default_factory=list)  # storage, in each param's layout
    grad_views: list[torch.Tensor] = field(default_factory=list)  # grad_buffer, same layout
    bound: list[bool] = field(default_factory=list)  # param.data is views[i]
    pointers: list[int] = field(default_factory=list)  # views[i].data_ptr()
    # sums a tensor over the processes holding other rows of these frames (None: whole frames)
    reduce: Callable[[torch.Tensor], object] | None = None
    workspace: torch.Tensor | None = None  # (f, n, p) working dtype: the new frames of a step

    @property
    def working_dtype(self) -> torch.dtype:
        return working_dtype(self.dtype)

    @property
    def single_frames(self) -> bool:
        return all(count == 1 for count in self.frames)

    def scratch(self) -> torch.Tensor:
        """A persistent ``(f, n, p)`` working-dtype buffer for the new frames of a full step.

        Allocated once: a fresh n-sized tensor every step costs page faults that, measured on
        the SmolLM2 factors on CPU, made up to a third of the step.
        """
        if self.workspace is None:
            n, p = self.shape
            self.workspace = torch.empty(
                (sum(self.frames), n, p), dtype=self.working_dtype, device=self.device
            )
        return self.workspace

    def offsets(self) -> list[int]:
        out, total = [], 0
        for count in self.frames:
            out.append(total)
            total += count
        return out

    def frame_index(self, positions: list[int]) -> torch.Tensor:
        """Indices (into the stacked frames) of the parameters at ``positions``."""
        offsets = self.offsets()
        ranges = [range(offsets[i], offsets[i] + self.frames[i]) for i in positions]
        return torch.tensor([j for r in ranges for j in r], device=self.device)

    def _stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        n, p = self.shape
        if all(t.dim() == 2 for t in tensors):
            return torch.stack(tensors)  # (k, n, p)
        return torch.cat([t.reshape(-1, n, p) for t in tensors])  # (f, n, p)

    def bind(self) -> None:
        """Allocate the persistent buffers and make tall parameters views of the storage.

        After this, each tall plain parameter's ``.data`` is ``storage[offset : offset + f_i]``
        viewed as its shape (contiguous), so a step reads and writes the parameters in place
        with no stacking or copy back. Wide parameters (their view would be non-contiguous,
        which ``safetensors`` and others reject), parameters whose ``.data`` is not a plain
        strided tensor, and every bucket holding a DTensor keep the copying path. Cost: one
        copy of the parameters, once.
        """
        if any(is_distributed_tensor(param) for param in self.params):
            return
        n, p = self.shape
        total = sum(self.frames)
        self.storage = torch.empty((total, n, p), dtype=self.dtype, device=self.device)
        self.grad_buffer = torch.empty((total, n, p), dtype=self.working_dtype, device=self.device)
        self.views, self.grad_views, self.bound, self.pointers = [], [], [], []
        for param, offset, count in zip(self.params, self.offsets(), self.frames, strict=True):
            tall = param.shape[-2] >= param.shape[-1]
            leading = oriented(param).shape[:-2]
            view = self.storage[offset : offset + count].view(*leading, n, p)  # tall layout
            grad_view = self.grad_buffer[offset : offset + count].view(*leading, n, p)
            view = view if tall else view.mT  # the parameter's own layout
            self.views.append(view)
            self.grad_views.append(grad_view if tall else grad_view.mT)
            self.pointers.append(view.data_ptr())
            view.copy_(param.detach())
            self.bound.append(False)
            self._point(len(self.bound) - 1)

    def _point(self, i: int) -> None:
        """Make ``params[i].data`` the storage view (when allowed); ``views[i]`` holds its value."""
        param, view = self.params[i], self.views[i]
        if (
            view.is_contiguous()
            and type(param.data) is torch.Tensor
            and param.layout == torch.strided
            and param.shape == view.shape
            and param.dtype == view.dtype
            and param.device == view.device
        ):
            param.data = view
            self.bound[i] = True

    def _attach(self, chosen: list[int], read: bool) -> list[int]:
        """Check that bound parameters are still storage views; returns the unbound positions.

        A parameter whose ``.data`` was replaced (``model.to()``, ``load_state_dict`` with
        ``assign=True``, a wrapper) is copied into the storage and re-pointed when it still
        fits, else it stays on the copying path. With ``read``, the storage receives the current
        values of the unbound parameters. Host-side checks only (no sync).
        """
        params, bound, pointers, views = self.params, self.bound, self.pointers, self.views
        for i in chosen:
            if bound[i]:
                param = params[i]
                if param.data_ptr() == pointers[i] and param.shape == views[i].shape:
                    continue
                bound[i] = False
                views[i].copy_(param.detach())
                self._point(i)
        unbound = [i for i in chosen if not bound[i]]
        if read and unbound:
            torch._foreach_copy_([views[i] for i in unbound], [params[i] for i in unbound])
        return unbound

    def stack_params(self, positions: list[int] | None) -> torch.Tensor:
        """``(f, n, p)`` copy of the (oriented) parameters, in the parameter dtype."""
        chosen = self.params if positions is None else [self.params[i] for i in positions]
        return self._stack([oriented_local(param) for param in chosen])

    def stack_grads(self, positions: list[int] | None) -> torch.Tensor:
        """``(f, n, p)`` copy of the (oriented) gradients in the working dtype; grads untouched."""
        if self.grad_buffer is not None and positions is None:
            # into the persistent buffer: no allocation per step
            grads = [param.grad for param in self.params]
            if self.single_frames and all(
                g.dim() == 2
                and g.shape[0] >= g.shape[1]
                and g.dtype == v.dtype
                and g.shape == v.shape
                and v.is_contiguous()
                for g, v in zip(grads, self.grad_views, strict=True)
            ):
                return torch.stack(grads, out=self.grad_buffer)  # (f, n, p)
            torch._foreach_copy_(self.grad_views, grads)
            return self.grad_buffer
        chosen = self.params if positions is None else [self.params[i] for i in positions]
        stacked = self._stack([oriented_local(param.grad) for param in chosen])
        return stacked.to(self.working_dtype)

    def points(self, positions: list[int] | None, index: torch.Tensor | None) -> torch.Tensor:
        """Current frames in the working dtype: the master copy for half parameters."""
        if self.storage is not None:
            chosen = list(range(len(self.params))) if positions is None else positions
            self._attach(chosen, read=self.master is None)
        if self.master is not None:
            return self.master if index is None else self.master.index_select(0, index)
        if self.storage is not None:
            return self.storage if index is None else self.storage.index_select(0, index)
        return self.stack_params(positions)

    def write_points(
        self, positions: list[int] | None, index: torch.Tensor | None, new: torch.Tensor
    ) -> None:
        """Store the new ``(f, n, p)`` frames: master copy (if any) and parameters (rounded)."""
        if self.master is not None:
            if index is None:
                self.master.copy_(new)
            else:
                self.master.index_copy_(0, index, new)
        chosen = list(range(len(self.params))) if positions is None else positions
        if self.storage is not None:
            # bound parameters are views of the storage: written here, in place
            if index is None:
                self.storage.copy_(new)
            else:
                self.storage.index_copy_(0, index, new.to(self.storage.dtype))
            unbound = [i for i in chosen if not self.bound[i]]
            if unbound:
                params = [self.params[i] for i in unbound]
                torch._foreach_copy_(params, [self.views[i] for i in unbound])
            return
        targets = [oriented_local(self.params[i]) for i in chosen]
        if all(count == 1 for count in (self.frames[i] for i in chosen)):
            sources = list(new.unbind(0))  # (n, p) views
        else:
            counts = [self.frames[i] for i in chosen]
            sources = [s.view(t.shape) for s, t in zip(new.split(counts), targets, strict=True)]
        torch._foreach_copy_(targets, sources)

    def gather_state(self, index: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if index is None:
            return self.state
        return {name: value.index_select(0, index) for name, value in self.state.items()}

    def scatter_state(self, index: torch.Tensor | None, values: dict[str, torch.Tensor]) -> None:
        if index is None:
            return
        for name, value in values.items():
            self.state[name].index_copy_(0, index, value)

    def advance(self, positions: list[int] | None) -> None:
        """Count one step for the parameters at ``positions`` (host ints and state tensors)."""
        if positions is None:
            self.steps.add_(1)
            self.steps_host = [count + 1 for count in self.steps_host]
            return
        for i in positions:
            self.steps_host[i] += 1
        self.steps[positions] += 1


def _tail(kind: str, shape: tuple[int, int]) -> tuple[int, int]:
    return {FRAME: shape, SQUARE: (shape[1], shape[1])}.get(kind, (1, 1))


def build_bucket(
    group_index: int,
    params: list[torch.Tensor],
    state: dict[torch.Tensor, dict[str, object]],
    spec: dict[str, str],
) -> Bucket:
    """Stack the per-parameter state of ``params`` (zeros where absent) into a new bucket.

    ``spec`` maps state names to :data:`FRAME`, :data:`SCALAR` or :data:`SQUARE`. Afterwards
    ``state[param]`` holds views into the stacked tensors (and ``"step"``, a 0-d view into the
    bucket's step counts). Reading loaded step counts syncs once per parameter (lazy rebuild).

    Raises:
        ValueError: if a loaded state tensor does not fit the parameter (for example the state
            was saved with another ``second_moment``).
    """
    first = params[0]
    shape = (oriented_local(first).shape[-2], oriented_local(first).shape[-1])  # local (n, p)
    dtype, device = first.dtype, first.device
    work = working_dtype(dtype)
    frames = [math.prod(oriented_local(param).shape[:-2]) for param in params]
    names = dict(spec)
    if dtype in HALF_DTYPES:
        names["master"] = FRAME
    stacked: dict[str, torch.Tensor] = {}
    for name, kind in names.items():
        pieces = []
        for param, count in zip(params, frames, strict=True):
            tail = _tail(kind, shape)
            saved = state.get(param, {}).get(name)
            if saved is None:
                pieces.append(torch.zeros((count, *tail), dtype=work, device=device))
                continue
            if not isinstance(saved, torch.Tensor) or saved.numel() != count * math.prod(tail):
                raise ValueError(
                    f"optimizer state {name!r} of the parameter of shape {tuple(param.shape)} "
                    f"has shape {tuple(getattr(saved, 'shape', ()))}, expected "
                    f"{(*oriented_local(param).shape[:-2], *tail)}; was it saved with other "
                    "options (for example another `second_moment`)?"
                )
            pieces.append(saved.to(dtype=work, device=device).reshape(count, *tail))
        stacked[name] = torch.cat(pieces)  # (f, *tail)
    steps_host = [int(state.get(param, {}).get("step", 0)) for param in params]
    bucket = Bucket(
        group_index=group_index,
        shape=shape,
        dtype=dtype,
        device=device,
        params=list(params),
        frames=frames,
        steps_host=steps_host,
        steps=torch.tensor(steps_host, dtype=torch.float32),
        master=stacked.pop("master", None),
    )
    bucket.state = stacked
    for i, (param, offset) in enumerate(zip(params, bucket.offsets(), strict=True)):
        leading = oriented_local(param).shape[:-2]
        entry = state.setdefault(param, {})
        entry.clear()
        entry["step"] = bucket.steps[i]
        for name, kind in names.items():
            source = bucket.master if name == "master" else bucket.state[name]
            entry[name] = source[offset : offset + frames[i]].view(*leading, *_tail(kind, shape))
    bucket.bind()
    return bucket
