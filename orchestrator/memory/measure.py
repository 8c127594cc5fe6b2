"""Memory as measured on a device: the state it holds, and the activations of one step.

`state_bytes(model, optimizers)` counts the bytes of the tensors this process holds for the model's
parameters, their gradients and the optimizer's state. `ActivationMeter` measures the peak of one training
step's activations. The planner (orchestrator/memory/plan.py) predicts both from the config alone; the tests
hold the two against each other.

Units: bytes. What is counted is storages, not tensor sizes: a view keeps its whole storage alive, so a
tensor's bytes are its storage's (`untyped_storage().nbytes()`), and a storage two tensors share is counted
once (FSDP2's reduce-scatter output, for one, is a single buffer that every sharded gradient of an FSDP unit
views; its parameter shards are each padded to ceil(n0 / W) rows, and the storage holds the padding).
"""
from __future__ import annotations

import contextlib
import gc
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from orchestrator.model.checkpointing import set_observer
from orchestrator.parallel.sharding import local


def _key(t: torch.Tensor) -> tuple[str, int, int]:
    s = t.untyped_storage()
    return (t.device.type, t.device.index or 0, s.data_ptr())


def _inner_optimizers(optimizers: Any) -> Iterator[torch.optim.Optimizer]:
    """The optimizers that hold state in this process: a ZeroRedundancyOptimizer's local `.optim` (the AdamW of
    its partition), a container's members (anything with `.optimizers`, as parallel.sharding.Optimizers)."""
    if optimizers is None:
        return
    if hasattr(optimizers, "optimizers") and not isinstance(optimizers, torch.optim.Optimizer):
        optimizers = optimizers.optimizers
    if isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "state"):
        optimizers = [optimizers]
    for opt in optimizers:
        yield getattr(opt, "optim", opt)


def state_bytes(model: nn.Module, optimizers: Any = None) -> dict[str, int]:
    """Bytes of model state this process holds: {"params", "grads", "optimizer"}.

    params: the storages of `model.parameters()` (a DTensor: its local shard); grads: of their `.grad`;
    optimizer: of every tensor in the optimizers' states (AdamW: exp_avg, exp_avg_sq and the `step` scalar,
    4 bytes, per parameter it updates). Buffers (RoPE tables, router biases) are not counted. Each storage is
    counted once, in the first category that holds it."""
    seen: set[tuple[str, int, int]] = set()

    def total(tensors: Iterable[torch.Tensor | None]) -> int:
        n = 0
        for t in tensors:
            if t is None:
                continue
            t = local(t)
            key = _key(t)
            if key in seen:
                continue
            seen.add(key)
            n += t.untyped_storage().nbytes()
        return n

    params = list(model.parameters())
    return {"params": total(params),
            "grads": total(p.grad for p in params),
            "optimizer": total(v for opt in _inner_optimizers(optimizers) for st in opt.state.values()
                               for v in st.values() if torch.is_tensor(v))}


class _Saved:
    """What the autograd graph keeps instead of a saved tensor: the tensor, and a release when the graph drops it."""
    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: "ActivationMeter", key: tuple) -> None:
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self) -> None:
        self.meter._release(self.key)


class ActivationMeter:
    """Peak bytes of activations over one training step's forward and backward: `with ActivationMeter(model) as
    m: loss = ...; loss.backward()`, then `m.peak_bytes`.

    On CPU (and on GPU with `use_allocator=False`) the meter counts the tensors autograd saves for backward,
    through torch.autograd.graph.saved_tensors_hooks: a storage is counted from the moment the first op saves it
    until the graph releases its last saver (after that node's backward), once however many ops save it (a
    linear's input is its norm's output). Not counted: parameters, views of them and buffers (their storages
    are state, not activations; FSDP2's all-gathered parameters are comm buffers to the planner), tensors no op
    saves (a layer's output that only feeds the next op, the logits that only feed the loss, gradients,
    temporaries of backward), and the allocator's rounding and fragmentation. Counted: bf16 copies autocast
    makes of weights and inputs (new storages a matmul saves).

    Activation checkpointing: a checkpointed region's forward saves nothing (its own hooks hide it from these),
    and what the checkpoint keeps of its inputs is counted (torch saves them through the default hooks). Its
    recomputation in backward runs under hooks of its own; model/checkpointing.py tells this meter when one
    starts, and the meter then chains a hook under the checkpoint's that counts every tensor the recomputation
    saves, from then until its storage is freed (watched by a weak reference to the storage): so the peak
    includes one recomputed region's activations on top of what is still held when it is recomputed.

    On a GPU the meter reads the caching allocator instead: peak_bytes = torch.cuda.max_memory_allocated() during
    the step minus torch.cuda.memory_allocated() before it. That counts everything allocated meanwhile
    (activations, gradients that did not exist before, temporaries, communication buffers), not only saved
    tensors, and so is an upper bound of the saved-tensor figure."""

    def __init__(self, model: nn.Module | None = None, device: torch.device | str | None = None,
                 use_allocator: bool | None = None) -> None:
        self.device = torch.device(device) if device is not None else (
            next(model.parameters()).device if model is not None else torch.device("cpu"))
        self.use_allocator = self.device.type == "cuda" if use_allocator is None else use_allocator
        state = list(model.parameters()) + list(model.buffers()) if model is not None else []
        self._state_keys = {_key(local(t)) for t in state}
        self._live: dict[tuple, list] = {}        # storage key -> [bytes, savers alive]
        self._recomputed: dict[tuple, tuple] = {}  # storage key -> (bytes, weak reference): saved by a recomputation
        self.current_bytes = self.peak_bytes = 0
        self.recomputations = 0
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "ActivationMeter":
        if self.use_allocator:
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
        self._stack.enter_context(set_observer(self))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.use_allocator:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        self._stack.close()
        self._purge()

    # ------------------------------------------------------------------ saved tensors
    def _is_state(self, t: torch.Tensor, key: tuple) -> bool:
        """A parameter, a view of one, or a buffer: FSDP2's unsharded parameters (all-gathered for forward and
        backward) are parameters too, registered on their modules while unsharded."""
        return (key in self._state_keys or isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)
                or t.untyped_storage().nbytes() == 0)

    def _pack(self, t: torch.Tensor) -> Any:
        key = _key(t)
        if self._is_state(t, key):
            return t
        self._add(key, t)
        # Detached (same storage, no grad_fn): an op that saves its own output (a custom autograd Function's
        # ctx.save_for_backward(out)) would otherwise tie its node -> this object -> the output -> its grad_fn,
        # a cycle through C++ that no collector sees: every step's graph leaked. unpack needs the content only.
        return _Saved(t.detach(), self, key)

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _add(self, key: tuple, t: torch.Tensor) -> None:
        if key in self._recomputed:
            self._purge()
        entry = self._live.get(key)
        if entry is not None:
            entry[1] += 1
        elif key in self._recomputed:  # saved again by the backward of a recomputed region: counted already
            self._live[key] = [0, 1]
        else:
            self._live[key] = [t.untyped_storage().nbytes(), 1]
            self._grow(self._live[key][0])

    def _grow(self, nbytes: int) -> None:
        if self._recomputed:  # a recomputed storage freed since the last look no longer counts (it was counted
            self._purge()     # until a pointer's reuse or the next recomputation noticed: the peak moved with it)
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _release(self, key: tuple) -> None:
        entry = self._live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._live[key]
                self.current_bytes -= entry[0]

    def _purge(self) -> None:
        """Forget recomputed storages that are gone (their data pointers may be reused)."""
        for k in [k for k, (_, weak) in self._recomputed.items() if weak.expired()]:
            self.current_bytes -= self._recomputed.pop(k)[0]

    # ------------------------------------------------------------------ recomputation (checkpointing.py)
    def recomputing(self, region: int) -> "_Recomputing":
        """Count what a recomputation saves: a pack hook chained under the checkpoint's own. What earlier
        recomputations saved is normally gone by now (their regions' backward is done); what only a reference
        cycle still holds (frames of a traceback, seen in a process's first steps) is collected here, so that
        the garbage collector's timing does not move the peak."""
        self.recomputations += 1
        self._purge()
        if self._recomputed:
            gc.collect(1)   # young generations: where a cycle made moments ago is (a full collection costs more)
            self._purge()
        return _Recomputing(self)

    def _pack_recomputed(self, t: torch.Tensor) -> None:
        key = _key(t)
        if not self._is_state(t, key) and key not in self._live:
            self._purge()
            if key not in self._recomputed:
                self._recomputed[key] = (t.untyped_storage().nbytes(), StorageWeakRef(t.untyped_storage()))
                self._grow(self._recomputed[key][0])


class _Recomputing:
    """The hooks of one recomputation. A class, not a generator context manager: checkpoint's early stop ends a
    recomputation with an exception, and a generator's __exit__ re-raising it would tie the exception, its
    traceback and the recomputed tensors in the traceback's frames into a cycle that only the garbage
    collector frees (the meter would then see them live for longer than they are without it)."""

    def __init__(self, meter: ActivationMeter) -> None:
        self.meter, self.hooks = meter, None

    def __enter__(self) -> None:
        inner = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if inner is None:
            return
        pack_inner, unpack_inner = inner
        meter = self.meter

        def pack(t: torch.Tensor) -> Any:
            meter._pack_recomputed(t)
            return pack_inner(t)

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack_inner)
        self.hooks.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.hooks is not None:
            self.hooks.__exit__()
            self.hooks = None
