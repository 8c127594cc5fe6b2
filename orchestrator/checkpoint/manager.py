"""The driver's side of checkpoints: when to save, the atomic commit, retention, finding what to resume.

Layout under the checkpoint root (`checkpoint.dir`, default <run dir>/checkpoints; a path or URI):
    step_00000100/dense.safetensors, experts-00000.safetensors, ..., manifest.json
A checkpoint exists only once its `manifest.json` does. The driver writes it after every device
reported its files written, with one atomic operation (rename locally, one PUT on object stores).
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

from orchestrator.checkpoint.shard import CheckpointError
from orchestrator.config import Config, to_dict
from orchestrator.storage import Storage, StorageError

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

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "CheckpointManifest":
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except Exception as e:
            raise CheckpointError(f"{where}/{MANIFEST} is not a valid checkpoint manifest: {e}") from None

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())


def check_compatible(manifest: CheckpointManifest, cfg: Config, where: str) -> None:
    mine = model_fingerprint(cfg)
    if manifest.fingerprint == mine:
        return
    theirs = manifest.fingerprint
    diffs = [f"model.{k}: checkpoint {theirs['model'].get(k)!r}, this run {v!r}"
             for k, v in mine["model"].items() if theirs.get("model", {}).get(k) != v]
    if theirs.get("dtype") != mine["dtype"]:
        diffs.append(f"train.dtype: checkpoint {theirs.get('dtype')!r}, this run {mine['dtype']!r}")
    raise CheckpointError(f"checkpoint {where} was saved with a different model config ({'; '.join(diffs)}); "
                          f"resume with the same model settings")


class CheckpointManager:
    """Save policy, commit and retention for one run; `find` picks what to resume from."""

    def __init__(self, cfg: Config, root_uri: str):
        self.cfg, self.policy = cfg, cfg.checkpoint
        self.storage = Storage(root_uri)
        self.fingerprint = model_fingerprint(cfg)
        self.pending: dict[int, dict[int, dict[str, Any]]] = {}   # step -> rank -> save result
        self.started: dict[int, float] = {}
        self.committed_steps: list[int] = []
        self.failed_steps: list[int] = []
        self.failure_detail: dict[int, str] = {}
        self.failure_ranks: dict[int, list[int]] = {}
        self.last_saved_step = 0
        self.write_seconds: dict[int, float] = {}    # step -> slowest device's background write
        self.commit_seconds: dict[int, float] = {}   # step -> snapshot started .. manifest committed
        self.bytes_saved: dict[int, int] = {}

    # ------------------------------------------------------------ saving
    def due(self, step: int) -> bool:
        every = self.policy.every_steps
        return bool(every) and step % every == 0

    def uri_for(self, step: int) -> str:
        return self.storage.child(step_dir(step)).uri

    def started_save(self, step: int) -> None:
        """Called before the devices write step `step`. A committed checkpoint of the same step (left by
        an earlier run that went further than the one resuming now) is removed first, so that its
        manifest never describes files that are being rewritten."""
        if self.storage.exists(f"{step_dir(step)}/{MANIFEST}"):
            log.warning("replacing the existing checkpoint at step %d under %s", step, self.storage.uri)
            self.storage.delete_dir(step_dir(step))
        self.pending.setdefault(step, {})
        self.started[step] = time.perf_counter()
        self.last_saved_step = step

    def add_results(self, results: list[dict[str, Any]], world: int) -> list[int]:
        """Take save results from device reports; commit each step all devices finished. Returns committed steps."""
        done = []
        for r in results:
            self.pending.setdefault(r["step"], {})[r["rank"]] = r
        for step in sorted(self.pending):
            by_rank = self.pending[step]
            if len(by_rank) < world:
                continue
            del self.pending[step]
            errors = [f"rank {rank}: {r['error']}" for rank, r in sorted(by_rank.items()) if r.get("error")]
            if errors:
                self.failure_ranks[step] = sorted(rank for rank, r in by_rank.items() if r.get("error"))
                self.failed(step, "; ".join(errors))
                continue
            self.commit(step, by_rank, world)
            done.append(step)
        return done

    def failed(self, step: int, detail: str) -> None:
        self.pending.pop(step, None)
        self.started.pop(step, None)
        self.failed_steps.append(step)
        self.failure_detail[step] = detail
        log.error("checkpoint at step %d not committed (%s); the previous checkpoint is kept", step, detail)

    def commit(self, step: int, by_rank: dict[int, dict[str, Any]], world: int) -> CheckpointManifest:
        files: dict[str, dict[str, Any]] = {}
        expert_files: dict[str, dict[str, str]] = {}
        for r in by_rank.values():
            files.update(r["files"])
            for layer, placement in r["expert_files"].items():
                expert_files.setdefault(layer, {}).update(placement)
        manifest = CheckpointManifest(step=step, world_size=world, files=files, expert_files=expert_files,
                                      optimizer_step=by_rank[0]["optimizer_step"],
                                      config_hash=fingerprint_hash(self.fingerprint), fingerprint=self.fingerprint,
                                      seed=self.cfg.seed, placement=by_rank[0].get("placement"))
        self.storage.write_atomic(f"{step_dir(step)}/{MANIFEST}", manifest.to_json())
        self.committed_steps.append(step)
        elapsed = time.perf_counter() - self.started.pop(step, time.perf_counter())
        self.commit_seconds[step] = elapsed
        self.write_seconds[step] = max(float(r.get("write_s", 0.0)) for r in by_rank.values())
        self.bytes_saved[step] = manifest.total_bytes
        log.info("checkpoint step %d committed: %.1f MB in %d files, %.2fs from snapshot to commit",
                 step, manifest.total_bytes / 1e6, len(files), elapsed)
        self.apply_retention()
        return manifest

    def apply_retention(self) -> None:
        """Keep the last `keep_last` committed checkpoints and every `keep_every`-th; clear failed saves."""
        committed = self.committed()
        keep = set(committed[-self.policy.keep_last:]) if self.policy.keep_last else set(committed)
        if self.policy.keep_every:
            keep |= {s for s in committed if s % self.policy.keep_every == 0}
        newest = committed[-1] if committed else 0
        for name in self.storage.list_dirs():
            step = _parse_step(name)
            if step is None or step in keep or step in self.pending:
                continue
            if step in committed or step < newest:  # an old checkpoint, or an uncommitted leftover before the newest
                self.storage.delete_dir(name)

    # ----------------------------------------------------------- reading
    def committed(self) -> list[int]:
        return [step for step, _ in list_checkpoints(self.storage)]


def _parse_step(name: str) -> int | None:
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def read_manifest(storage: Storage, where: str) -> CheckpointManifest:
    return CheckpointManifest.from_json(storage.read(MANIFEST), where)


def verify(storage: Storage) -> tuple[CheckpointManifest | None, str | None]:
    """(manifest, None) when every file is there with its size and checksum; else (manifest or None, problem)."""
    where = storage.uri
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
            raise CheckpointError(f"cannot resume from {resume}: {problem}")
        return root, manifest  # type: ignore[return-value]
    candidates = list_checkpoints(root)
    if not candidates:
        if resume == "latest":
            return None
        raise CheckpointError(f"train.resume={resume!r}: no committed checkpoint (a step_* folder with a "
                              f"{MANIFEST}) there; give a checkpoint folder, a checkpoint root, or 'latest'")
    for step, ckpt in reversed(candidates):
        manifest, problem = verify(ckpt)
        if problem is None:
            return ckpt, manifest  # type: ignore[return-value]
        log.warning("checkpoint at step %d does not verify (%s); falling back to an older one", step, problem)
    raise CheckpointError(f"no checkpoint under {root.uri} verifies; the newest problem: {problem}")


__all__ = ["CheckpointManager", "CheckpointManifest", "CheckpointError", "find_resume",
           "verify", "list_checkpoints", "read_manifest", "check_compatible", "step_dir", "MANIFEST"]
