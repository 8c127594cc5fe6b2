"""Sharded, atomic, asynchronous checkpoints: device side (shard.py), on storage (manager.py), coordination
(coordinator.py: snapshots, writes, commits), runs and timelines (timeline.py), in-memory snapshots, tools."""
from orchestrator.checkpoint.manager import (MANIFEST, CheckpointManifest, check_compatible, find_resume,
                                             list_checkpoints, read_manifest, step_dir, verify)
from orchestrator.checkpoint.shard import DENSE_FILE, CheckpointError, Snapshot, expert_file

__all__ = ["MANIFEST", "CheckpointManifest", "check_compatible", "find_resume",
           "list_checkpoints", "read_manifest", "step_dir", "verify", "DENSE_FILE", "CheckpointError", "Snapshot",
           "expert_file"]
