"""Checkpoints on storage: the manifest and its atomic commit, verification, retention, what to resume from.

Layout under a run's checkpoint folder (<run dir>/checkpoints, or <checkpoint.dir>/<run id> when
`checkpoint.dir` is set: a root several runs share; see timeline.py):
    step_00000100/dense.safetensors, experts-00000.safetensors, ..., manifest.json
A checkpoint exists only once its `manifest.json` does. The driver writes it after every shard file
is written (coordinator.py), with one atomic operation (rename locally, one PUT on object stores).
A save that fails midway leaves a folder without a manifest, which nothing loads and the next
commit clears away; earlier checkpoints are separate folders and are never touched by it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from orchestrator.checkpoint.shard import CheckpointError, check_file_name
from orchestrator.config import Config, ModelConfig, to_dict
from orchestrator.checkpoint.storage import Storage, StorageError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def model_fingerprint(cfg: Config) -> dict[str, Any]:
    """What must match for a checkpoint to load: the model's shape and the parameter dtype."""
    return {"model": to_dict(cfg)["model"], "dtype": cfg.train.dtype}


def fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class CheckpointManifest:
    step: int                                  # steps completed; training resumes at step + 1
    world_size: int
    files: dict[str, dict[str, Any]]           # name -> {size, sha256}
    expert_files: dict[str, dict[str, str]]    # MoE layer -> {global expert id: file} (one copy of replicas)
    optimizer_step: int
    config_hash: str
    fingerprint: dict[str, Any]
    seed: int
    created: float = field(default_factory=time.time)
    format: int = FORMAT
    placement: Optional[list[list[list[int]]]] = None  # [MoE layer][device] -> expert ids, replicas included
    run_id: Optional[str] = None               # the run it belongs to (None: written before runs had ids)
    parent: Optional[dict[str, Any]] = None    # what it descends from: {run_id, step} (None: the initial state)
    lr_horizon: Optional[int] = None           # the step the LR schedule's cosine ends at (kept on resume)
    training: Optional[dict[str, Any]] = None  # the settings exact continuation depends on (seed, data, train, balance)
    index: Optional[dict[str, list[list[Any]]]] = None  # key -> [[file, dim, start, stop], ...]: where each piece of each
                                               # tensor is (shard.take_snapshot); None: written before sharded states
    layout: Optional[dict[str, Any]] = None    # world, expert_parallel, data_parallel, zero_stage it was saved with
    optimizer_steps: Optional[dict[str, int]] = None  # tensor name -> its AdamW step count where not optimizer_step,
                                               # 0: no state (shard.py); None: written before they were recorded

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "CheckpointManifest":
        try:
            raw = json.loads(data)
            manifest = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except Exception as e:
            raise CheckpointError(f"{where}/{MANIFEST} is not a valid checkpoint manifest: {e}") from None
        names = list(manifest.files) + [f for layer in manifest.expert_files.values() for f in layer.values()]
        names += [pc[0] for pieces in (manifest.index or {}).values() for pc in pieces]
        for name in names:  # names are joined into paths: nothing may point outside the checkpoint folder
            check_file_name(name, f"{where}/{MANIFEST}")
        return manifest

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())


# Model keys that shape no parameter: a resume may change them (DeepSeek-V3 lowers the MTP loss weight mid-run).
_RESUMABLE_MODEL_KEYS = ("mtp_weight",)


def check_compatible(manifest: CheckpointManifest, cfg: Config, where: str) -> None:
    """Refuse a checkpoint saved with other model settings or dtype. A model key the checkpoint does not name
    (added to ModelConfig after it was written) counts as its default, what the code did before the key existed."""
    mine = model_fingerprint(cfg)
    if manifest.fingerprint == mine:
        return
    theirs = manifest.fingerprint
    defaults = ModelConfig()
    diffs = [f"model.{k}: checkpoint {theirs.get('model', {}).get(k)!r}, this run {v!r}"
             for k, v in mine["model"].items() if k not in _RESUMABLE_MODEL_KEYS
             and theirs.get("model", {}).get(k, getattr(defaults, k, None)) != v]
    if theirs.get("dtype") != mine["dtype"]:
        diffs.append(f"train.dtype: checkpoint {theirs.get('dtype')!r}, this run {mine['dtype']!r}")
    if not diffs:
        return
    raise CheckpointError(f"checkpoint {where} was saved with a different model config ({'; '.join(diffs)}); "
                          f"resume with the same model settings")


def commit_manifest(storage: Storage, manifest: CheckpointManifest) -> None:
    """Make the checkpoint of `manifest.step` exist: its manifest written with one atomic operation."""
    storage.write_atomic(f"{step_dir(manifest.step)}/{MANIFEST}", manifest.to_json())


def apply_retention(storage: Storage, keep_last: int, keep_every: int, protect: set[int]) -> list[int]:
    """Under one run's checkpoint folder: keep the last `keep_last` committed checkpoints (0: all), every
    `keep_every`-th, and the steps in `protect` (the one just committed, the ones being written); delete the
    other committed ones and the uncommitted leftovers older than the newest commit. The steps deleted."""
    committed = [step for step, _ in list_checkpoints(storage)]
    keep = set(committed[-keep_last:]) if keep_last else set(committed)
    if keep_every:
        keep |= {s for s in committed if s % keep_every == 0}
    keep |= protect
    newest = committed[-1] if committed else 0
    deleted = []
    for name in storage.list_dirs():
        step = _parse_step(name)
        if step is None or step in keep:
            continue
        if step in committed or step < newest:  # an old checkpoint, or an uncommitted leftover before the newest
            storage.delete_dir(name)
            deleted.append(step)
    return deleted


def _parse_step(name: str) -> int | None:
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def read_manifest(storage: Storage, where: str) -> CheckpointManifest:
    return CheckpointManifest.from_json(storage.read(MANIFEST), where)


def verify(storage: Storage) -> tuple[CheckpointManifest | None, str | None]:
    """(manifest, None) when every file is there with its size and checksum; else (manifest or None, problem)."""
    where = storage.shown
    try:
        manifest = read_manifest(storage, where)
    except (CheckpointError, StorageError) as e:
        return None, str(e)
    for name, meta in sorted(manifest.files.items()):
        try:
            size = storage.size(name)
            if size is None:
                return manifest, f"{where}/{name} is missing"
            if size != meta["size"]:
                return manifest, f"{where}/{name} is {size} bytes, the manifest says {meta['size']} (truncated?)"
            if hashlib.sha256(storage.read(name)).hexdigest() != meta["sha256"]:
                return manifest, f"{where}/{name} does not match its sha256 checksum (corrupted)"
        except StorageError as e:
            return manifest, str(e)
    return manifest, None


def list_checkpoints(root: Storage) -> list[tuple[int, Storage]]:
    """Committed checkpoints under a root, oldest first."""
    out = []
    for name in root.list_dirs():
        step = _parse_step(name)
        if step is not None and root.exists(f"{name}/{MANIFEST}"):
            out.append((step, root.child(name)))
    return sorted(out, key=lambda x: x[0])


def find_resume(resume: str, default_root: str) -> tuple[Storage, CheckpointManifest] | None:
    """The checkpoint to resume from: `latest` (under the run's checkpoint root) or a path/URI.

    A path to one checkpoint must verify; `latest` or a path to a root takes the newest checkpoint
    that verifies and says which ones it skipped. None when `latest` finds no checkpoint at all.
    """
    root = Storage(default_root if resume == "latest" else resume)
    if resume != "latest" and root.exists(MANIFEST):
        manifest, problem = verify(root)
        if problem:
            raise CheckpointError(f"cannot resume from {root.shown}: {problem}")
        return root, manifest  # type: ignore[return-value]
    candidates = list_checkpoints(root)
    if not candidates:
        if resume == "latest":
            return None
        raise CheckpointError(f"train.resume={root.shown!r}: no committed checkpoint (a step_* folder with a "
                              f"{MANIFEST}) there; give a checkpoint folder, a checkpoint root, or 'latest'")
    for step, ckpt in reversed(candidates):
        manifest, problem = verify(ckpt)
        if problem is None:
            return ckpt, manifest  # type: ignore[return-value]
        log.warning("checkpoint at step %d does not verify (%s); falling back to an older one", step, problem)
    raise CheckpointError(f"no checkpoint under {root.shown} verifies; the newest problem: {problem}")


__all__ = ["CheckpointManifest", "CheckpointError", "find_resume", "commit_manifest", "apply_retention",
           "verify", "list_checkpoints", "read_manifest", "check_compatible", "step_dir", "MANIFEST"]
