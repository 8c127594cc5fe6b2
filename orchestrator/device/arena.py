"""The arena: a CPU device's parameters and AdamW moments held as views of one flat buffer per kind and dtype, so
that an in-memory snapshot reaches the object store as a few large arrays instead of one per tensor.

Why (issue 23, the device's idle time between steps): Ray pickles a snapshot's arrays one by one. Measured on
the 2-core VM (the default model at N = 1, 343 arrays, 20.7 MB, a snapshot every 0.5 s): `ray.put` of the
snapshot took 8.7 ms, of one array of the same bytes 3.7 ms. A snapshot (checkpoint/shard.py `Snapshot`) whose
arrays view an arena pickles as the arena's buffers, the part of each that it covers, and a table of where each
array lies in them (`Snapshot.__getstate__`); unpickled, the arrays are views of those buffers again.
The same layout as Megatron-Core's contiguous parameter and gradient buffers (`_ParamAndGradBuffer`) and
DeepSpeed's flat buffers, here for the optimizer's state too, and for the snapshot rather than the collectives.

What the arena holds: every parameter that is a plain CPU tensor (not a DTensor shard) of a dtype numpy has, and
the exp_avg and exp_avg_sq of those whose AdamW state this device holds whole (not a ZeRO-1 partition's). One
buffer per kind (param, exp_avg, exp_avg_sq) and dtype: memory/measure.py counts storages, and finds parameters
and optimizer state apart as before. In each buffer the experts come first, then the dense parameters: a device
that writes only its experts to a snapshot (any but rank 0) covers a prefix of each buffer.

`Arena.ensure(params, optim)` before a snapshot: when every such tensor already views the arena (and it holds
nothing else), nothing happens. Otherwise the arena is built anew: each tensor copied in, each parameter
re-pointed at its view (`p.data = view`: the same Parameter, so the optimizer's keys and the model's hooks stay),
each moment replaced by its view in its AdamW state. The values are the same (a copy); training goes on in place
on the views (AdamW updates its parameters and moments in place), so the next snapshot sees the new values
without a copy. A tensor replaced since (the moments a restore or a load gives, the first step's new moments; a
restore copies parameters in place) fails the check, and the arena is built again, with the skeleton below
dropped; a snapshot never reads a view the live state has left. Each view starts 64-byte aligned, as a tensor of
its own would (ALIGN). A build holds the old tensors and the new buffers at once: for that moment, twice the
device's parameter and optimizer-state memory (at the first snapshot with moments, and after a restore or load).

`skeleton`: what a snapshot holds of the arena's tensors once every parameter and moment the device writes views
the arena (checkpoint/shard.py `_Skeleton`): their views, keys, index and places, reused by the next snapshots
while the arena's build, the experts each slot holds and the parameters' state (moments or none yet) stay the
same; only the buffers, the RNG state, the extras and the step counts are taken anew. The walk over every
expert row is the rest of a snapshot's Python time.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

KINDS = ("param", "exp_avg", "exp_avg_sq")
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def _fits(t: Any) -> bool:
    """A tensor the arena can hold: a plain CPU tensor (no DTensor) of a numpy dtype, contiguous."""
    return (torch.is_tensor(t) and not hasattr(t, "device_mesh") and t.device.type == "cpu"
            and t.dtype in _NUMPY_DTYPES and t.is_contiguous() and t.numel() > 0)


def _held(params: list[nn.Parameter], optim: Any) -> Iterator[tuple[str, Any, Any, torch.Tensor]]:
    """(kind, owner, slot, tensor) of every tensor the arena holds: a parameter (owner the Parameter, slot None)
    or a moment (owner its AdamW state dict, slot the moment's name); in the order of `params`, each once."""
    seen: set[int] = set()
    for p in params:
        if id(p) in seen or not _fits(p):
            continue
        seen.add(id(p))
        yield "param", p, None, p
        if not optim.owns(p) or optim.partitioned(p):
            continue
        state = optim.state_of(p)
        for moment in KINDS[1:]:
            t = (state or {}).get(moment)
            if t is not None and _fits(t) and t.shape == p.shape and t.dtype == p.dtype:
                yield moment, state, moment, t


ALIGN = 64   # bytes: where each view starts, as torch's CPU allocator aligns a tensor of its own (MKL's GEMMs give
             # other bits in float64 for an operand 8 bytes off 16-byte alignment: measured on this VM's torch 2.13)


def _aligned(numel: int, element_size: int) -> int:
    """Elements a tensor of `numel` takes in a buffer, rounded up so that the next one starts ALIGN-aligned."""
    per = ALIGN // element_size
    return -(-numel // per) * per


class Arena:
    """One device's arena (module docstring): `buffers[(kind, dtype)]` a flat tensor; `numpy()` their numpy views,
    what a snapshot carries to pickle its arrays as slices of them."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._spans: dict[tuple[str, torch.dtype], tuple[int, int]] = {}   # a buffer's [first, end) byte addresses
        self.builds = 0   # how often the arena was built (the tests check it is not rebuilt without cause)
        self.skeleton: Any = None   # what a snapshot holds of the arena's tensors (checkpoint/shard.py _Skeleton)

    def ensure(self, params: list[nn.Parameter], optim: Any) -> None:
        """Make every one of `params` (experts first, then dense: the device's lists, as its optimizer has them) and
        its moments that the arena holds (module docstring) a view of it: nothing when they already are, else
        build it anew (a copy of each; the live tensors re-pointed at their views)."""
        held = list(_held(params, optim))
        size: dict[tuple[str, torch.dtype], int] = {}
        fresh = True
        for kind, _, _, t in held:
            key = (kind, t.dtype)
            size[key] = size.get(key, 0) + _aligned(t.numel(), t.element_size())
            if fresh:
                span = self._spans.get(key)
                fresh = span is not None and span[0] <= t.data_ptr() < span[1]
        if fresh and size == {k: b.numel() for k, b in self.buffers.items()}:
            return
        self._build(held, size)

    def _build(self, held: list[tuple[str, Any, Any, torch.Tensor]], size: dict[tuple[str, torch.dtype], int]
               ) -> None:
        self.skeleton = None   # its views are of the buffers given up here (and would keep them alive)
        buffers = {key: torch.empty(n, dtype=key[1]) for key, n in size.items()}
        offset = dict.fromkeys(size, 0)
        with torch.no_grad():
            for kind, owner, slot, t in held:
                key = (kind, t.dtype)
                view = buffers[key][offset[key]:offset[key] + t.numel()].view(t.shape)
                offset[key] += _aligned(t.numel(), t.element_size())
                view.copy_(t)
                if slot is None:
                    owner.data = view
                else:
                    owner[slot] = view
        self.buffers = buffers
        self._spans = {key: (b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for key, b in buffers.items()}
        self.builds += 1

    def spans(self) -> list[tuple[int, int, torch.dtype]]:
        """Each buffer's (address, bytes, dtype), in the order of `numpy()`."""
        return [(b.data_ptr(), b.numel() * b.element_size(), b.dtype) for b in self.buffers.values()]

    def numpy(self) -> list[np.ndarray]:
        """The buffers as numpy arrays (views, no copy)."""
        return [b.numpy() for b in self.buffers.values()]


__all__ = ["Arena", "KINDS"]
