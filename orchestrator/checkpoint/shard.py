"""A device's side of checkpoints: snapshot its state to host memory, persist it, load it back.

What a device owns in a checkpoint (safetensors; nothing that needs unpickling):
  dense.safetensors          rank 0 only: replicated parameters, their AdamW moments, persistent
                             buffers (router expert_bias). Every device holds the same values.
  experts-<rank>.safetensors each rank: its routed experts, one tensor per (parameter, global
                             expert id), with their AdamW moments; and its torch RNG state.
Keys: `param/<name>`, `exp_avg/<name>`, `exp_avg_sq/<name>`, `buffer/<name>`, `rng/torch`, `extra/<key>` (rank 0's
dense file: the run's own state beside the model's, e.g. RL's next batch one step off-policy; a device's own file:
its own such state, e.g. anticipatory routing's cached ids of its slice), where an
expert's <name> is `<parameter name>[<global expert id>]`. Because experts are stored by global
id, a checkpoint written by N devices loads into M devices: each takes the ids it now holds.
What AdamW holds is saved as it is: beside the moments, `optimizer_steps` (in the manifest) gives each <name>
whose state's step count differs from the checkpoint's `optimizer_step`, 0 for "no state": a parameter that
never had a gradient (DeepSeek-V4's indexer; any parameter the forward leaves out) or a frozen one. Restoring
gives it no state, as AdamW had, instead of asking for moments that never existed.
"""
from __future__ import annotations

import hashlib
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from orchestrator.config import redact_url
from orchestrator.errors import CheckpointError, StateMismatch

log = logging.getLogger(__name__)

DENSE_FILE = "dense.safetensors"


def expert_file(rank: int) -> str:
    return f"experts-{rank:05d}.safetensors"


_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")


def check_file_name(name: object, where: str) -> str:
    """`name` if it is a plain file name inside the checkpoint (what shards are called: dense.safetensors,
    experts-00003.safetensors); else CheckpointError. A manifest is data read from storage: a name such as
    `../../etc/passwd` or `/etc/passwd` in it must not make a load read (or a tool export) anything outside."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        raise CheckpointError(f"{redact_url(where)}: the manifest names the file {name!r}, which is not a plain "
                              f"file name inside the checkpoint (letters, digits, '.', '_', '-', not starting with "
                              f"'.'; no '/' or '\\'): the manifest is damaged or was tampered with; refusing to "
                              f"read it")
    return name


def check_manifest_names(manifest: dict, where: str) -> None:
    """Every file name a manifest holds: the files it lists and those its expert placement points to."""
    for name in manifest["files"]:
        check_file_name(name, where)
    for pieces in (manifest.get("index") or {}).values():
        for piece in pieces:
            check_file_name(piece[0], where)
    for placed in manifest["expert_files"].values():
        for name in placed.values():
            check_file_name(name, where)


@dataclass
class Snapshot:
    """Host-memory copy of one device's state at the end of `step`, grouped by the file it goes to.

    Arrays are numpy (torch only for dtypes numpy lacks, such as bfloat16): the Ray object store
    takes numpy buffers without pickling them, about ten times faster than torch tensors.
    """
    step: int
    rank: int
    files: dict[str, dict[str, np.ndarray | torch.Tensor]]
    optimizer_step: int
    expert_files: dict[str, dict[str, str]] = field(default_factory=dict)  # MoE layer -> {expert id: file}
    placement: list[list[list[int]]] = field(default_factory=list)  # [MoE layer][device] -> expert ids (slot order)
    index: dict[str, list[list[Any]]] = field(default_factory=dict)  # key -> [[file, dim, start, stop], ...] (dim None:
                                                                    # the whole tensor); see take_snapshot
    optimizer_steps: dict[str, int] = field(default_factory=dict)  # <name> -> its AdamW step count where that is
                                                                   # not optimizer_step; 0: no state (module docstring)
    arena: list[np.ndarray] = field(default_factory=list, repr=False, compare=False)  # the buffers of the device's
        # arena (device/arena.py) that arrays in `files` view; empty once unpickled, and for copies
    in_arena: dict[str, dict[str, list[int]]] = field(default_factory=dict, repr=False, compare=False)  # file ->
        # key -> [buffer, element offset, size, ndim, *shape] of each array that views the arena

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (into the object store, say), the arrays that view the arena go as the part of each buffer they
        cover and a table of where each lies: a few large buffers instead of one per tensor (device/arena.py).
        The files keep their key order; every other array goes as it is."""
        state = dict(self.__dict__)
        arena, where = state.pop("arena"), state.pop("in_arena")
        if not arena or not where:
            return state
        files: dict[str, dict[str, Any]] = {}
        rows: list[list[int]] = []
        for name, arrays in self.files.items():
            placed = where.get(name)
            if not placed:
                files[name] = arrays
                continue
            files[name] = {key: None if key in placed else a for key, a in arrays.items()}   # None: its place in
            rows += [list(placed[key]) for key in arrays if key in placed]                   # the key order
        lo, hi = [None] * len(arena), [0] * len(arena)
        for b, o, n, *_ in rows:
            lo[b] = o if lo[b] is None else min(lo[b], o)
            hi[b] = max(hi[b], o + n)
        width = max(len(r) for r in rows)
        for r in rows:
            r[1] -= lo[r[0]]
            r.extend([0] * (width - len(r)))
        state["files"] = files
        state["_packed"] = ([a[lo[b]:hi[b]] if lo[b] is not None else a[:0] for b, a in enumerate(arena)],
                            np.array(rows, dtype=np.int64))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        packed = state.pop("_packed", None)
        state.setdefault("arena", [])
        state.setdefault("in_arena", {})
        if packed is not None:
            buffers, table = packed
            rows = iter(table.tolist())
            for arrays in state["files"].values():
                for key, a in arrays.items():
                    if a is None:
                        b, o, n, ndim, *shape = next(rows)
                        arrays[key] = buffers[b][o:o + n].reshape(shape[:ndim])
        self.__dict__.update(state)


def _host_copy(t: torch.Tensor) -> np.ndarray | torch.Tensor:
    copy = t.detach().to("cpu", copy=True).contiguous()
    return _host_form(copy)


def _host_form(t: torch.Tensor) -> np.ndarray | torch.Tensor:
    return t if t.dtype == torch.bfloat16 else t.numpy()


class _HostStaging:
    """Copies of a device's tensors in host memory. From a GPU: into pinned (page-locked) buffers, every copy queued
    asynchronously on the current stream and waited for once at `finish` (torch's caching host allocator reuses the
    pinned pages from one snapshot to the next); from CPU: plain copies at once, or with `copy=False` views of the
    live tensors (for a snapshot serialized at once, as a Ray actor's return value is before the actor's next call:
    the object store's copy is then the only one)."""

    def __init__(self, copy: bool = True) -> None:
        self.pending: list[tuple[dict, str, torch.Tensor]] = []
        self.copy = copy

    def put(self, out: dict, key: str, t: torch.Tensor) -> None:
        t = t.detach()
        if not t.is_cuda:
            out[key] = _host_copy(t) if self.copy else _host_form(t.contiguous())
            return
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        out[key] = None   # its place in the file's key order, filled at finish()
        self.pending.append((out, key, host))

    def finish(self) -> None:
        if self.pending:
            torch.cuda.current_stream().synchronize()
        for out, key, host in self.pending:
            out[key] = _host_form(host)
        self.pending = []


def as_torch(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


def take_snapshot(model: torch.nn.Module, optim: Any, rank: int, step: int, dp_rank: int = 0,
                  extra: dict[str, torch.Tensor] | None = None, own_extra: dict[str, torch.Tensor] | None = None,
                  copy: bool = True, arena: Any = None) -> Snapshot:
    """Copy parameters, optimizer moments, buffers and RNG to host memory (training may go on after); `extra`
    (rank 0): tensors of the run's own state saved beside them as `extra/<key>` in the dense file (RL's pending
    batch, device/rl.py), given back by `restore`; `own_extra`: this device's own such state (anticipatory routing's
    cached ids of its slice, device/anticipate.py), as `extra/<key>` in its own file, given back to the same rank.

    Each logical tensor (`param/<name>`, `exp_avg/<name>`, ...; an expert's <name> is `<parameter>[<id>]`) is
    written once over all devices: a replicated one by rank 0 (dense) or by the first data-parallel replica
    (experts), a sharded one (FSDP2) by every holder as its piece `<key>@<dim>:<start>:<stop>`, a ZeRO-1
    moment by the device whose partition owns it. `index` says which file holds which piece of which key.
    `copy=False`: CPU tensors are not copied but viewed (valid until training goes on: see _HostStaging); `arena`:
    the device's Arena (device/arena.py): with `copy=False`, the arrays that view it are pickled as slices of
    its buffers."""
    if arena is not None and not copy:
        sk = arena.skeleton
        if sk is not None and sk.key == _skeleton_key(sk.modules, sk.plan, optim, arena, rank, dp_rank):
            return _from_skeleton(sk, model, optim, arena, rank, step, extra, own_extra)
        arena.skeleton = None   # out of date: made anew below if it can be, else none (it would hold old views)
    snap = _SnapshotWriter(optim, rank, copy, arena)
    snap.dense_parameters(model)
    dense_part, index_dense = (dict(snap.dense), dict(snap.index)) if snap.spans else ({}, {})
    snap.dense_rest(model, extra)
    index_before = set(snap.index) if snap.spans else set()
    expert_files = snap.expert_parameters(model, dp_rank)
    if snap.spans and snap.outside == 0:
        # every parameter and moment written views the arena (buffers go apart: put's `packed`): what they are is
        # kept as the skeleton of the next snapshots, until anything it depends on changes (_skeleton_key)
        modules = [model.get_submodule(n.rsplit(".", 1)[0]) for n, _ in model.expert_parameters()]
        arena.skeleton = _Skeleton(
            None, modules, snap.plan, dense_part if rank == 0 else {},
            {k: v for k, v in snap.mine.items() if k != "rng/torch"}, index_dense,
            {k: v for k, v in snap.index.items() if k not in index_before}, expert_files, snap.in_arena)
        arena.skeleton.key = _skeleton_key(modules, snap.plan, optim, arena, rank, dp_rank)
    files = snap.files(own_extra)
    snap.staging.finish()
    return Snapshot(step=step, rank=rank, files=files, optimizer_step=optim.optimizer_step,
                    expert_files=expert_files, placement=model.placement(), index=snap.index,
                    optimizer_steps=snap.steps, arena=arena.numpy() if snap.in_arena else [], in_arena=snap.in_arena)


@dataclass
class _Skeleton:
    """What a snapshot of a device whose parameters and moments all view its arena holds of them (device/
    arena.py): the views themselves (their values are the live ones), their keys in file order, index, expert
    files and places in the arena. Valid while `key` holds (_skeleton_key); the buffers, RNG, extras and step
    counts are taken anew each time."""
    key: Any
    modules: list[Any]                       # the expert modules, in the order of the model's expert parameters
    plan: list[tuple[list[str], Any, str]]   # (optimizer_steps keys, parameter, "frozen" | "owned")
    dense: dict[str, Any]                    # rank 0's dense file: its parameters and moments
    mine: dict[str, Any]                     # its own file: its experts (after the RNG state)
    index_dense: dict[str, list[list[Any]]]
    index_experts: dict[str, list[list[Any]]]
    expert_files: dict[str, dict[str, str]]
    in_arena: dict[str, dict[str, list[int]]]


def _skeleton_key(modules: list[Any], plan: list[tuple[list[str], Any, str]], optim: Any, arena: Any, rank: int,
                  dp_rank: int) -> tuple:
    """All that a skeleton depends on: the arena's build (the views: whatever gives a parameter or moment a tensor
    of its own makes the next snapshot rebuild the arena), the device's ranks, the experts each module holds and
    which of them are primary copies, and for each parameter whether it takes gradients and whether its AdamW
    state has moments yet (a state that has not stepped has none). The parameters themselves are the same
    objects for a shard's life (its optimizer holds them)."""
    return (arena.builds, rank, dp_rank, tuple((tuple(m.expert_ids), tuple(m.primary)) for m in modules),
            tuple((p.requires_grad, how == "owned" and optim.step_of(p) == 0) for _, p, how in plan))


def _from_skeleton(sk: _Skeleton, model: torch.nn.Module, optim: Any, arena: Any, rank: int, step: int,
                   extra: dict[str, torch.Tensor] | None, own_extra: dict[str, torch.Tensor] | None) -> Snapshot:
    """take_snapshot's result for a device whose skeleton holds: the same keys in the same order, the same index
    and expert files; the buffers, RNG state, extras and step counts taken now."""
    snap = _SnapshotWriter(optim, rank, False)
    snap.dense = dict(sk.dense)
    snap.dense_rest(model, extra)
    snap.mine.update(sk.mine)
    files = snap.files(own_extra)
    index = {k: list(v) for k, v in sk.index_dense.items()}
    index.update(snap.index)
    index.update((k, list(v)) for k, v in sk.index_experts.items())
    steps: dict[str, int] = {}
    for keys, p, how in sk.plan:
        record = _record(optim, p, how)
        if record is not None:
            steps.update(dict.fromkeys(keys, record))
    return Snapshot(step=step, rank=rank, files=files, optimizer_step=optim.optimizer_step,
                    expert_files={k: dict(v) for k, v in sk.expert_files.items()}, placement=model.placement(),
                    index=index, optimizer_steps=steps, arena=arena.numpy(), in_arena=sk.in_arena)


class _SnapshotWriter:
    """What take_snapshot gathers: the dense file's tensors (rank 0), this device's own file's (its experts, its
    pieces of sharded tensors, its RNG), the index of pieces and the AdamW step counts that differ."""

    def __init__(self, optim: Any, rank: int, copy: bool = True, arena: Any = None) -> None:
        self.optim, self.rank = optim, rank
        self.spans = arena.spans() if arena is not None and not copy else []   # (address, bytes, dtype) per buffer
        self.in_arena: dict[str, dict[str, list[int]]] = {}
        self.outside = 0   # parameters and moments written that do not view the arena (with one)
        self.plan: list[tuple[list[str], Any, str]] = []   # (its optimizer_steps keys, parameter, how it records)
        self.index: dict[str, list[list[Any]]] = {}
        self.staging = _HostStaging(copy)
        self.dense: dict[str, np.ndarray | torch.Tensor] = {}
        self.mine: dict[str, np.ndarray | torch.Tensor] = {"rng/torch": torch.get_rng_state().numpy()}
        self.own = expert_file(rank)
        self.steps: dict[str, int] = {}

    def put(self, file: str, key: str, t: torch.Tensor, piece: Any, at: list[int] | None = None,
            packed: bool = True) -> None:
        """`at`: where t lies in the arena, [buffer, element offset], if the caller knows (else found here);
        `packed=False`: t goes into a pickle as an array of its own even if it views the arena (a buffer: one may
        be a parameter under another name, as a tied head is in a transformers model's state_dict, and two keys
        unpickled as views of one buffer would share memory, which safetensors refuses to write)."""
        if piece.dim is not None and piece.start == piece.stop:
            return   # an empty shard (fewer rows than devices): nothing of the tensor here
        name, full = (DENSE_FILE, self.dense) if file == DENSE_FILE else (self.own, self.mine)
        full_key = key + piece.suffix()
        self.staging.put(full, full_key, t)
        self.index.setdefault(key, []).append([file, piece.dim, piece.start, piece.stop])
        if self.spans and packed:   # where in the arena it lies, if it views it (Snapshot.__getstate__)
            at = at or self.at(t)
            if at is None:
                self.outside += 1
            else:
                self.in_arena.setdefault(name, {})[full_key] = [*at, t.numel(), t.dim(), *t.shape]

    def at(self, t: torch.Tensor) -> list[int] | None:
        """[buffer, element offset] of t in the arena, or None: not a contiguous view of it."""
        start = t.data_ptr()
        for b, (base, nbytes, dtype) in enumerate(self.spans):
            if base <= start < base + nbytes:
                return [b, (start - base) // t.element_size()] if t.dtype == dtype and t.is_contiguous() else None
        return None

    def moments(self, p: torch.Tensor, first: bool, sharded: bool, keys: list[str]
                ) -> tuple[int | None, dict[str, torch.Tensor]]:
        """p's AdamW state as this device writes it: the step count to record under its <name> (None: none; 0: no
        state, frozen or never stepped; see `optimizer_steps`) and its moments by name (none to write: another device
        writes them, the rank 0, the first replica or the ZeRO-1 owner; or there are none). `keys`: the names its
        count is recorded under (in `plan`, for a snapshot made from the skeleton: _record)."""
        from orchestrator.parallel.sharding import local

        optim = self.optim
        if not (first or sharded or optim.partitioned(p)):
            return None, {}   # another device writes this state (rank 0, the first replica, or the ZeRO-1 owner)
        if not optim.owns(p):
            self.plan.append((keys, p, "frozen"))
            return _record(optim, p, "frozen"), {}   # frozen: in no optimizer
        self.plan.append((keys, p, "owned"))
        count = optim.step_of(p)
        record = _record(optim, p, "owned")
        if count == 0:
            return record, {}
        state = optim.state_of(p)
        return record, {moment: local(state[moment]) for moment in ("exp_avg", "exp_avg_sq")}

    def dense_parameters(self, model: torch.nn.Module) -> None:
        from orchestrator.parallel.sharding import local, piece_of

        rank, own = self.rank, self.own
        for name, p in model.dense_parameters():
            piece = piece_of(p)
            sharded = piece.dim is not None
            file = own if sharded or (self.optim.partitioned(p) and rank != 0) else DENSE_FILE
            if sharded or rank == 0:
                self.put(own if sharded else DENSE_FILE, f"param/{name}", local(p), piece)
            record, moments = self.moments(p, rank == 0, sharded, [name])
            if record is not None:
                self.steps[name] = record
            for moment, t in moments.items():
                self.put(file, f"{moment}/{name}", t, piece)

    def dense_rest(self, model: torch.nn.Module, extra: dict[str, torch.Tensor] | None) -> None:
        """After the dense parameters, rank 0's buffers and the run's extras (take_snapshot's `extra`)."""
        if self.rank == 0:
            self.buffers(model)
            for key, t in (extra or {}).items():
                self.dense[f"extra/{key}"] = t.detach().cpu().clone()

    def files(self, own_extra: dict[str, torch.Tensor] | None) -> dict[str, dict[str, np.ndarray | torch.Tensor]]:
        """The files, once the experts are written: rank 0's dense file, and this device's own with its extras."""
        for key, t in (own_extra or {}).items():
            self.mine[f"extra/{key}"] = t.detach().cpu().clone()
        return {**({DENSE_FILE: self.dense} if self.rank == 0 else {}), self.own: self.mine}

    def buffers(self, model: torch.nn.Module) -> None:
        from orchestrator.parallel.sharding import piece_of

        param_names = {n for n, _ in model.named_parameters()}
        for name, b in model.state_dict().items():
            if name not in param_names:
                self.put(DENSE_FILE, f"buffer/{name}", b, piece_of(b), packed=False)

    def expert_parameters(self, model: torch.nn.Module, dp_rank: int) -> dict[str, dict[str, str]]:
        """Write this device's experts; return which file holds each expert of each MoE layer it writes. An expert
        parameter's state is looked up once for all its experts, and its rows taken as views in one call (unbind):
        the walk over every expert is most of a snapshot's Python time."""
        from orchestrator.parallel.sharding import local, piece_of

        own = self.own
        expert_files: dict[str, dict[str, str]] = {}
        for name, p in model.expert_parameters():
            # This layer's experts on this device (placement may differ per layer); of replicas, only the primary.
            ids = [(j, gid) for j, (gid, primary) in enumerate(zip(model.expert_ids_of(name), model.primary_of(name)))
                   if primary]
            piece = piece_of(p, drop_leading=True)
            sharded = piece.dim is not None
            record, moments = self.moments(p, dp_rank == 0, sharded, [f"{name}[{gid}]" for _, gid in ids])
            rows = local(p).unbind(0) if ids and (sharded or dp_rank == 0) else ()
            moment_rows = {moment: t.unbind(0) for moment, t in moments.items()} if ids else {}
            at = {m: self.at(t) for m, t in (("param", local(p)), *moments.items())} if self.spans and ids else {}
            step = {m: t[0].numel() for m, t in (("param", rows), *moment_rows.items()) if t}   # elements a row
            for j, gid in ids:
                key = f"{name}[{gid}]"
                if rows:
                    self.put(own, f"param/{key}", rows[j], piece, _row(at.get("param"), j, step.get("param")))
                if record is not None:
                    self.steps[key] = record
                for moment, held in moment_rows.items():
                    self.put(own, f"{moment}/{key}", held[j], piece, _row(at.get(moment), j, step.get(moment)))
            if sharded or dp_rank == 0:
                expert_files[name.rsplit(".experts.", 1)[0]] = {str(gid): own for _, gid in ids}
        return expert_files


def _record(optim: Any, p: torch.Tensor, how: str) -> int | None:
    """The step count a snapshot records for p (`optimizer_steps`), by how p's state is held: "frozen" (in no
    optimizer) 0 if it takes no gradient, else none; "owned" its AdamW step count where that differs from the
    optimizer's."""
    if how == "frozen":
        return None if p.requires_grad else 0
    count = optim.step_of(p)
    return count if count != optim.optimizer_step else None


def _row(at: list[int] | None, j: int, step: int | None) -> list[int] | None:
    """Where row j of a stacked tensor lies in the arena, from where the tensor lies (rows of `step` elements)."""
    return None if at is None or step is None else [at[0], at[1] + j * step]


def serialize(tensors: dict[str, np.ndarray | torch.Tensor]) -> tuple[bytes, dict[str, object]]:
    """safetensors bytes of a snapshot's arrays, and their size and sha256. The arrays may be read-only views of
    the object store (a snapshot handed to the device writing it): they are only read here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = st_save({k: as_torch(v) for k, v in tensors.items()})
    return data, {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_verified(read: Callable[[str], bytes], name: str, expected: dict[str, object], where: str
                  ) -> dict[str, torch.Tensor]:
    """Read a shard file and check it against the manifest entry before parsing it."""
    check_file_name(name, where)
    where = redact_url(where)
    data = read(name)
    if len(data) != expected["size"]:
        raise CheckpointError(f"{where}/{name} is {len(data)} bytes, the manifest says {expected['size']}: "
                              f"the file is truncated or was replaced")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise CheckpointError(f"{where}/{name} does not match its sha256 checksum in the manifest: the file is corrupted")
    try:
        return st_load(data)
    except Exception as e:
        raise CheckpointError(f"{where}/{name} is not a readable safetensors file: {e}") from None


Locate = Callable[[str], list[list[Any]]]


def legacy_locate(expert_files: dict[str, dict[str, str]]) -> Locate:
    """Where a key lives in a checkpoint without an index (written before sharded states): dense keys in
    dense.safetensors, an expert's in the file its placement names, whole."""
    def locate(key: str) -> list[list[Any]]:
        name = key.split("/", 1)[1]
        if name.endswith("]") and ".experts." in name:
            layer, gid = name.rsplit(".experts.", 1)[0], name.rsplit("[", 1)[1][:-1]
            file = expert_files.get(layer, {}).get(gid)
            return [[file, None, 0, 0]] if file else []
        return [[DENSE_FILE, None, 0, 0]]
    return locate


def restore_from_files(model: torch.nn.Module, optim: Any, rank: int,
                       manifest: dict, read: Callable[[str], bytes], where: str) -> dict[str, torch.Tensor]:
    """Load this device's part of a committed checkpoint (written by any number of devices, in any layout and ZeRO
    stage). Every file name the manifest holds is checked before anything is read (check_file_name)."""
    files = manifest["files"]
    check_manifest_names(manifest, where)
    where = redact_url(where)
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def tensors(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            check_file_name(name, where)
            if name not in files:
                raise CheckpointError(f"{where}: the manifest lists no file {name}")
            cache[name] = load_verified(read, name, files[name], where)
        return cache[name]

    index = manifest.get("index")
    locate = (lambda key: index.get(key, [])) if index else legacy_locate(manifest["expert_files"])
    return restore(model, optim, rank, locate, manifest["optimizer_step"], tensors, where,
                   manifest.get("optimizer_steps"))


def merge_optimizer_steps(into: dict[str, int], more: dict[str, int], where: str) -> None:
    """Add one device's `optimizer_steps` to those of the others. Devices holding pieces of one tensor (FSDP2)
    record the same count; should two disagree (the devices' states diverged), the largest is kept, with a warning."""
    for name, count in more.items():
        if name in into and into[name] != count:
            log.warning("%s: %s has AdamW step count %d, another device's piece of it %d; keeping %d", where, name,
                        count, into[name], max(count, into[name]))
            count = max(count, into[name])
        into[name] = count


def restore_from_snapshots(model: torch.nn.Module, optim: Any, rank: int, snapshots: list[Snapshot]
                           ) -> dict[str, torch.Tensor]:
    """Load this device's part from in-memory snapshots of one step (those holding the pieces it needs)."""
    files = {name: {k: torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v.clone() for k, v in t.items()}
             for snap in snapshots for name, t in snap.files.items()}
    index: dict[str, list[list[Any]]] = {}
    steps: dict[str, int] = {}
    for snap in snapshots:
        for key, pieces in snap.index.items():
            index.setdefault(key, []).extend(pieces)
        merge_optimizer_steps(steps, snap.optimizer_steps, f"the snapshot of device {snap.rank}")
    where = f"in-memory snapshot of step {snapshots[0].step}"

    def tensors(name: str) -> dict[str, torch.Tensor]:
        if name not in files:
            raise StateMismatch(f"{where}: no {name} among the snapshots given")
        return files[name]

    return restore(model, optim, rank, lambda key: index.get(key, []), snapshots[0].optimizer_step, tensors, where,
                   steps)


def assemble(key: str, pieces: list[list[Any]], tensors: Callable[[str], dict[str, torch.Tensor]], where: str,
             want: Any = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Rows `want` (a sharding.Piece; None: all) of the logical tensor `key` of `shape`, from its pieces: one whole
    copy, or slices along one dim. Only the pieces that overlap the rows asked for are read, and they must cover
    them (a device restoring its own shard needs only its own snapshot; CheckpointError names the rows missing)."""
    if not pieces:
        raise StateMismatch(f"{where} has no tensor {key!r}: the checkpoint does not fit this model")

    def get(file: str, name: str) -> torch.Tensor:
        src = tensors(file)
        if name not in src:
            raise StateMismatch(f"{where}/{file} has no tensor {name!r}: the checkpoint does not fit this model")
        return src[name]

    whole = next((pc for pc in pieces if pc[1] is None), None)
    if whole is not None:
        t = get(whole[0], key)
        return t if want is None or want.dim is None else want.take(t)
    dim = pieces[0][1]
    if want is not None and want.dim is not None and want.dim != dim:
        raise StateMismatch(f"{where}: {key!r} is stored in slices of dim {dim}, asked for slices of dim {want.dim}")
    lo, hi = (want.start, want.stop) if want is not None and want.dim is not None else (0, None)
    if hi is None and shape is not None:
        hi = shape[dim]
    if hi is not None and lo >= hi:   # an empty shard (fewer rows than devices): no rows, the right shape
        file, _, start, stop = pieces[0]
        return get(file, f"{key}@{dim}:{start}:{stop}").narrow(dim, 0, 0)
    parts, at = [], lo
    for file, _, start, stop in sorted(pieces, key=lambda pc: pc[2]):
        if stop <= at or (hi is not None and start >= hi):
            continue
        if start > at:
            break
        t = get(file, f"{key}@{dim}:{start}:{stop}")
        end = stop if hi is None else min(stop, hi)
        parts.append(t.narrow(dim, at - start, end - at))
        at = end
        if hi is not None and at >= hi:
            break
    if (hi is not None and at < hi) or (hi is None and not parts):
        raise StateMismatch(f"{where}: the pieces of {key!r} at hand leave rows {at}:{hi} of dim {dim} out")
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]


def restore(model: torch.nn.Module, optim: Any, rank: int, locate: Locate, optimizer_step: int,
            tensors: Callable[[str], dict[str, torch.Tensor]], where: str,
            optimizer_steps: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Put parameters, AdamW state, buffers and RNG back: every tensor this device holds (its piece of a sharded
    one) is cut from the whole logical tensor, assembled from wherever `locate(key)` says its pieces are. A
    parameter's AdamW state gets the step count `optimizer_steps` gives its name (else `optimizer_step`); a count
    of 0 restores "no state yet", and nothing is read for it. `optimizer_steps` None: a checkpoint written before
    they were recorded, whose writer left out exactly the moments of parameters without state: a parameter
    whose moments are nowhere in it has none."""
    back = _Restorer(optim, locate, tensors, where, optimizer_step, optimizer_steps)
    for name, p in model.dense_parameters():
        back.parameter(p, [name], experts=False)
    param_names = {n for n, _ in model.named_parameters()}
    with torch.no_grad():
        for name, b in model.state_dict(keep_vars=True).items():
            if name not in param_names:
                b.copy_(back.part(f"buffer/{name}", None, tuple(b.shape)))
    for name, p in model.expert_parameters():
        back.parameter(p, [f"{name}[{gid}]" for gid in model.expert_ids_of(name)], experts=True)
    optim.steps_taken = optimizer_step
    own: dict[str, torch.Tensor] = {}
    try:  # the same rank existed when it was saved
        mine = tensors(expert_file(rank))
        torch.set_rng_state(mine["rng/torch"])
        own = {k[len("extra/"):]: v for k, v in mine.items() if k.startswith("extra/")}
    except CheckpointError:
        pass
    if rank != 0:
        return own
    return {**{k[len("extra/"):]: v for k, v in tensors(DENSE_FILE).items() if k.startswith("extra/")}, **own}


@dataclass
class _Restorer:
    """restore's reading of one checkpoint: a parameter's piece of every logical tensor, and its AdamW state."""
    optim: Any
    locate: Locate
    tensors: Callable[[str], dict[str, torch.Tensor]]
    where: str
    optimizer_step: int
    optimizer_steps: dict[str, int] | None

    def part(self, key: str, piece: Any, shape: tuple[int, ...]) -> torch.Tensor:
        return assemble(key, self.locate(key), self.tensors, self.where, piece, shape)

    def parameter(self, p: torch.nn.Parameter, names: list[str], experts: bool) -> None:
        """p's value and AdamW state (an expert parameter's: the rows of the experts `names`, stacked)."""
        from orchestrator.parallel.sharding import local, piece_of

        piece = piece_of(p, drop_leading=experts)
        shape = tuple(p.shape[1:] if experts else p.shape)   # the logical tensor's (a DTensor's is global)

        def mine(prefix: str) -> torch.Tensor:
            parts = [self.part(f"{prefix}/{n}", piece, shape) for n in names]
            return torch.stack(parts) if experts else parts[0]

        with torch.no_grad():
            local(p).copy_(mine("param"))
        p.grad = None  # a step that failed halfway may have left gradients behind
        self.optim.set_state(p, None)
        if not self.optim.owns(p):
            return
        self._adamw_state(p, names, mine)

    def _adamw_state(self, p: torch.nn.Parameter, names: list[str], mine: Callable[[str], torch.Tensor]) -> None:
        from orchestrator.parallel.sharding import local

        count = {(self.optimizer_steps or {}).get(n, self.optimizer_step) for n in names}
        n = max(count)
        if len(count) > 1:   # experts from devices whose histories differ, now rows of one AdamW state: inexact
            log.warning("%s: the experts %s, now one parameter's rows, have different AdamW step counts %s; their "
                        "state takes step %d (the bias correction of the others' rows is not theirs)", self.where,
                        names, sorted(count), n)
        if n == 0:   # no state yet (never a gradient, or frozen when saved): AdamW makes it at the first gradient
            return
        try:
            saved = {moment: mine(moment) for moment in ("exp_avg", "exp_avg_sq")}
        except StateMismatch:
            if self.optimizer_steps is None:   # written before `optimizer_steps`: its writer left out the moments
                return                         # of exactly those parameters that had no state
            raise
        state = {"step": torch.tensor(float(n))}
        for moment, value in saved.items():
            m = torch.zeros_like(p)
            local(m).copy_(value)
            state[moment] = m
        self.optim.set_state(p, state)
