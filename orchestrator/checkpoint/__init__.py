"""Sharded, atomic, asynchronous checkpoints: device side (shard.py), driver side (manager.py), tools."""
from orchestrator.checkpoint.manager import (MANIFEST, CheckpointManager, CheckpointManifest, check_compatible,
                                             find_resume, list_checkpoints, read_manifest, step_dir, verify)
from orchestrator.checkpoint.shard import DENSE_FILE, CheckpointError, Snapshot, expert_file

__all__ = ["MANIFEST", "CheckpointManager", "CheckpointManifest", "check_compatible", "find_resume",
           "list_checkpoints", "read_manifest", "step_dir", "verify", "DENSE_FILE", "CheckpointError", "Snapshot",
           "expert_file"]
