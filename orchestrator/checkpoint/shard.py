"""A device's side of checkpoints: snapshot its state to host memory, persist it, load it back.

What a device owns in a checkpoint (safetensors; nothing that needs unpickling):
  dense.safetensors          rank 0 only: replicated parameters, their AdamW moments, persistent
                             buffers (router expert_bias). Every device holds the same values.
  experts-<rank>.safetensors each rank: its routed experts, one tensor per (parameter, global
                             expert id), with their AdamW moments; and its torch RNG state.
Keys: `param/<name>`, `exp_avg/<name>`, `exp_avg_sq/<name>`, `buffer/<name>`, `rng/torch`, where an
expert's <name> is `<parameter name>[<global expert id>]`. Because experts are stored by global
id, a checkpoint written by N devices loads into M devices: each takes the ids it now holds.
"""
from __future__ import annotations

import hashlib
import warnings
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from orchestrator.config import redact_url
from orchestrator.errors import RunError

DENSE_FILE = "dense.safetensors"


def expert_file(rank: int) -> str:
    return f"experts-{rank:05d}.safetensors"


class CheckpointError(RunError):
    """A checkpoint cannot be used; the message names the checkpoint, the file or the key."""


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


def _host_copy(t: torch.Tensor) -> np.ndarray | torch.Tensor:
    copy = t.detach().to("cpu", copy=True).contiguous()
    return _host_form(copy)


def _host_form(t: torch.Tensor) -> np.ndarray | torch.Tensor:
    return t if t.dtype == torch.bfloat16 else t.numpy()


class _HostStaging:
    """Copies of a device's tensors in host memory. From a GPU: into pinned (page-locked) buffers, every copy queued
    asynchronously on the current stream and waited for once at `finish` (torch's caching host allocator reuses the
    pinned pages from one snapshot to the next); from CPU: plain copies at once."""

    def __init__(self) -> None:
        self.pending: list[tuple[dict, str, torch.Tensor]] = []

    def put(self, out: dict, key: str, t: torch.Tensor) -> None:
        t = t.detach()
        if not t.is_cuda:
            out[key] = _host_copy(t)
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


def take_snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int, step: int) -> Snapshot:
    """Copy parameters, optimizer moments, buffers and RNG to host memory (training may go on after)."""
    state = optimizer.state
    files: dict[str, dict[str, np.ndarray | torch.Tensor]] = {}
    staging = _HostStaging()

    def add(out: dict, key: str, p: torch.Tensor, sl=None) -> None:
        staging.put(out, f"param/{key}", p if sl is None else p[sl])
        if p in state:
            for moment in ("exp_avg", "exp_avg_sq"):
                m = state[p][moment]
                staging.put(out, f"{moment}/{key}", m if sl is None else m[sl])

    if rank == 0:
        dense: dict[str, np.ndarray | torch.Tensor] = {}
        for name, p in model.dense_parameters():
            add(dense, name, p)
        param_names = {n for n, _ in model.named_parameters()}
        for name, b in model.state_dict().items():
            if name not in param_names:
                staging.put(dense, f"buffer/{name}", b)
        files[DENSE_FILE] = dense
    mine: dict[str, np.ndarray | torch.Tensor] = {"rng/torch": torch.get_rng_state().numpy()}
    expert_files: dict[str, dict[str, str]] = {}
    for name, p in model.expert_parameters():
        # This layer's experts on this device (placement may differ per layer); of replicas, only the primary copy.
        ids = [(j, gid) for j, (gid, primary) in enumerate(zip(model.expert_ids_of(name), model.primary_of(name)))
               if primary]
        for j, gid in ids:
            add(mine, f"{name}[{gid}]", p, j)
        expert_files[name.rsplit(".experts.", 1)[0]] = {str(gid): expert_file(rank) for _, gid in ids}
    files[expert_file(rank)] = mine
    staging.finish()
    steps = [int(s["step"]) for s in state.values() if "step" in s]
    return Snapshot(step=step, rank=rank, files=files, optimizer_step=steps[0] if steps else 0,
                    expert_files=expert_files, placement=model.placement())


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


def restore_from_files(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                       manifest: dict, read: Callable[[str], bytes], where: str) -> None:
    """Load this device's part of a committed checkpoint (written by any number of devices). Every file name the
    manifest holds is checked before anything is read (check_file_name)."""
    files = manifest["files"]
    check_manifest_names(manifest, where)
    where = redact_url(where)
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def tensors(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            if name not in files:
                raise CheckpointError(f"{where}: the manifest lists no file {name}")
            cache[name] = load_verified(read, name, files[name], where)
        return cache[name]

    restore(model, optimizer, rank, manifest["expert_files"], manifest["optimizer_step"], tensors, where)


def restore_from_snapshots(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                           snapshots: list[Snapshot]) -> None:
    """Load this device's part from in-memory snapshots of one step (rank 0's plus those holding its experts)."""
    files = {name: {k: torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v.clone() for k, v in t.items()}
             for snap in snapshots for name, t in snap.files.items()}
    expert_files: dict[str, dict[str, str]] = {}
    for snap in snapshots:
        for layer, placement in snap.expert_files.items():
            expert_files.setdefault(layer, {}).update(placement)
    where = f"in-memory snapshot of step {snapshots[0].step}"

    def tensors(name: str) -> dict[str, torch.Tensor]:
        if name not in files:
            raise CheckpointError(f"{where}: no {name} among the snapshots given")
        return files[name]

    restore(model, optimizer, rank, expert_files, snapshots[0].optimizer_step, tensors, where)


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
            expert_files: dict[str, dict[str, str]], optimizer_step: int,
            tensors: Callable[[str], dict[str, torch.Tensor]], where: str) -> None:
    """Put parameters, AdamW state, buffers and RNG back from `tensors(file name)`."""

    def take(src: dict[str, torch.Tensor], key: str, name: str) -> torch.Tensor:
        if key not in src:
            raise CheckpointError(f"{where}/{name} has no tensor {key!r}: the checkpoint does not fit this model")
        return src[key]

    step = torch.tensor(float(optimizer_step))

    def put(p: torch.nn.Parameter, values: list[tuple[dict, str, str]], stack: bool) -> None:
        def gather(prefix: str) -> torch.Tensor:
            parts = [take(src, f"{prefix}/{key}", name) for src, key, name in values]
            return torch.stack(parts) if stack else parts[0]

        with torch.no_grad():
            p.copy_(gather("param"))
        p.grad = None  # a step that failed halfway may have left gradients behind
        optimizer.state.pop(p, None)
        if optimizer_step > 0:
            optimizer.state[p] = {"step": step.clone(), "exp_avg": gather("exp_avg").to(p.device, p.dtype),
                                  "exp_avg_sq": gather("exp_avg_sq").to(p.device, p.dtype)}

    dense = tensors(DENSE_FILE)
    for name, p in model.dense_parameters():
        put(p, [(dense, name, DENSE_FILE)], stack=False)
    param_names = {n for n, _ in model.named_parameters()}
    with torch.no_grad():
        for name, b in model.state_dict(keep_vars=True).items():
            if name not in param_names:
                b.copy_(take(dense, f"buffer/{name}", DENSE_FILE))
    for name, p in model.expert_parameters():
        layer = name.rsplit(".experts.", 1)[0]
        where_of = expert_files.get(layer, {})
        values = []
        for gid in model.expert_ids_of(name):  # the experts this device holds now, wherever they were saved
            if str(gid) not in where_of:
                raise CheckpointError(f"{where}: the manifest places no expert {gid} of {layer}")
            values.append((tensors(where_of[str(gid)]), f"{name}[{gid}]", where_of[str(gid)]))
        put(p, values, stack=True)
    try:  # the same rank existed when it was saved
        torch.set_rng_state(tensors(expert_file(rank))["rng/torch"])
    except CheckpointError:
        pass
