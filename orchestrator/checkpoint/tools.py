"""Inspect and export checkpoints: `python -m orchestrator checkpoints list|export ...`."""
from __future__ import annotations

import json
import re
import time

import torch
from safetensors.torch import save as st_save

from orchestrator.checkpoint.manager import MANIFEST, _parse_step, list_checkpoints, verify
from orchestrator.checkpoint.shard import CheckpointError, assemble, load_verified
from orchestrator.checkpoint.storage import Storage

_EXPERT_KEY = re.compile(r"^(?P<name>.+)\[(?P<gid>\d+)\]$")


def checkpoint_root(path: str) -> Storage:
    """A run directory (its checkpoints/ folder), a checkpoint root, or one checkpoint folder."""
    storage = Storage(path)
    if not storage.exists(MANIFEST) and "checkpoints" in storage.list_dirs():
        return storage.child("checkpoints")
    return storage


def describe(path: str) -> list[dict]:
    """One row per checkpoint folder: step, size, world size, files, verified or the problem."""
    root = checkpoint_root(path)
    entries = [(None, root)] if root.exists(MANIFEST) else \
        [(_parse_step(n), root.child(n)) for n in root.list_dirs() if _parse_step(n) is not None]
    rows = []
    for step, ckpt in entries:
        if not ckpt.exists(MANIFEST):
            rows.append({"step": step, "uri": ckpt.shown, "status": "uncommitted (no manifest): never loaded"})
            continue
        manifest, problem = verify(ckpt)
        rows.append({"step": manifest.step if manifest else step, "uri": ckpt.shown,
                     "size_mb": round(manifest.total_bytes / 1e6, 2) if manifest else None,
                     "world_size": manifest.world_size if manifest else None,
                     "files": len(manifest.files) if manifest else None,
                     "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.created)) if manifest else None,
                     "status": "verified" if problem is None else f"BAD: {problem}"})
    return rows


def read_parameters(ckpt: Storage) -> tuple[dict[str, torch.Tensor], dict]:
    """Every parameter and buffer of a verified checkpoint (experts as `name[id]`), and the manifest."""
    manifest, problem = verify(ckpt)
    if problem is not None or manifest is None:
        raise CheckpointError(f"cannot read {ckpt.shown}: {problem}")
    out: dict[str, torch.Tensor] = {}
    loaded = {name: load_verified(ckpt.read, name, meta, ckpt.shown) for name, meta in manifest.files.items()}
    if manifest.index:  # pieces of sharded tensors (ZeRO stage 2/3) joined whole
        for key, pieces in manifest.index.items():
            kind, _, rest = key.partition("/")
            if kind in ("param", "buffer"):
                out[rest] = assemble(key, pieces, loaded.__getitem__, ckpt.shown)
        return out, manifest.__dict__
    for tensors in loaded.values():
        for key, t in tensors.items():
            kind, _, rest = key.partition("/")
            if kind in ("param", "buffer"):
                out[rest] = t
    return out, manifest.__dict__


def read_state(ckpt: Storage) -> dict[str, torch.Tensor]:
    """Every tensor of a verified checkpoint, optimizer moments and RNG included, keyed `file:key`."""
    manifest, problem = verify(ckpt)
    if problem is not None or manifest is None:
        raise CheckpointError(f"cannot read {ckpt.shown}: {problem}")
    return {f"{name}:{key}": t for name, meta in sorted(manifest.files.items())
            for key, t in load_verified(ckpt.read, name, meta, ckpt.shown).items()}


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors are not bit-identical (or exist on one side only); empty when the states are equal."""
    out = sorted(set(a) ^ set(b))
    out += [k for k in sorted(set(a) & set(b)) if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    return out


def full_state_dict(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Experts stacked back into the one-process model's tensors: loads into MoETransformer(cfg)."""
    experts: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for key, t in params.items():
        m = _EXPERT_KEY.match(key)
        if m:
            experts.setdefault(m["name"], {})[int(m["gid"])] = t
        else:
            out[key] = t
    for name, by_id in experts.items():
        out[name] = torch.stack([by_id[i] for i in sorted(by_id)])
    return out


def newest_checkpoint(path: str) -> Storage:
    """`path` when it is one checkpoint folder, else the newest committed checkpoint under it (a run directory or a
    checkpoint root). CheckpointError when there is none."""
    ckpt = Storage(path)
    if not ckpt.exists(MANIFEST):
        candidates = list_checkpoints(checkpoint_root(path))
        if not candidates:
            raise CheckpointError(f"{path}: no committed checkpoint (a step_* folder with a {MANIFEST}) to export")
        ckpt = candidates[-1][1]
    return ckpt


def export(path: str, out_file: str) -> dict:
    """Write the model weights of one checkpoint as a single safetensors file."""
    ckpt = newest_checkpoint(path)
    params, manifest = read_parameters(ckpt)
    state = full_state_dict(params)
    meta = {"step": str(manifest["step"]), "model": json.dumps(manifest["fingerprint"]["model"]),
            "source": ckpt.shown}
    data = st_save(state, metadata=meta)
    Storage(out_file.rsplit("/", 1)[0] if "/" in out_file else ".").write(out_file.rsplit("/", 1)[-1], data)
    return {"file": out_file, "tensors": len(state), "bytes": len(data), "step": manifest["step"], "source": ckpt.shown}
