"""The one typed config of a run: dataclasses + OmegaConf, validated before anything starts.

`load_config(path, overrides)` reads a YAML file (keys it does not know are errors), applies
dotlist overrides (`train.steps=50 model.num_experts=16`), and checks every value that would
otherwise fail late inside an actor. Every error is a `ConfigError` naming the key and the fix.

This package imports no torch and no Ray: validating a config costs nothing (an import-linter contract in
pyproject.toml keeps it so). Its modules:

    base.py      ConfigError, DEFAULT_CONFIG, the small checks, to_dict / to_yaml
    model.py     ModelConfig; a transformers model's keys, from facts the model layer describes
    data.py      DataConfig; which tokenizer a run reads, whether data.path holds token files
    train.py     TrainConfig, RunConfig, CheckpointConfig; RESUME_EXACT_KEYS, is_frozen
    balance.py   BalanceConfig
    mesh.py      ParallelConfig, MemoryConfig, ClusterConfig; mesh_shape, expert_slots, effective_zero_stage,
                 snapshot_in_thread
    faults.py    FaultKind, FaultSpec, ChaosConfig, FaultConfig
    monitor.py   AlertRule, MonitorConfig
    schema.py    Config, the root
    validate.py  validate: the sections' checks in order and those across sections
    idle.py      keys with no effect under the chosen options
    redact.py    secrets out of what is written or logged
    load.py      load_config, config_from_dict: YAML files and overrides
    docgen.py    docs/configuration-reference.md from the dataclasses' field comments
"""
from orchestrator.config.balance import BalanceConfig, anticipates
from orchestrator.config.base import DEFAULT_CONFIG, REPO_ROOT, ConfigError, to_dict, to_yaml
from orchestrator.config.data import TOKENIZER_FILES, DataConfig, reads_token_files, tokenizer_source
from orchestrator.config.faults import FAULT_KINDS, ChaosConfig, FaultConfig, FaultKind, FaultSpec
from orchestrator.config.load import config_from_dict, load_config
from orchestrator.config.mesh import ClusterConfig, MemoryConfig, ParallelConfig, effective_zero_stage, expert_slots, \
    mesh_shape, snapshot_in_thread
from orchestrator.config.model import ModelConfig, describe_hf_models_with
from orchestrator.config.monitor import AlertRule, MonitorConfig, _default_alerts
from orchestrator.config.redact import REDACTED, redact_text, redact_url, redacted, redacted_yaml
from orchestrator.config.schema import Config
from orchestrator.config.train import RESUME_EXACT_KEYS, CheckpointConfig, RunConfig, TrainConfig, is_frozen
from orchestrator.config.validate import validate

__all__ = ["AlertRule", "BalanceConfig", "ChaosConfig", "CheckpointConfig", "ClusterConfig", "Config", "ConfigError",
           "DEFAULT_CONFIG", "DataConfig", "FAULT_KINDS", "FaultConfig", "FaultKind", "FaultSpec", "MemoryConfig", "ModelConfig",
           "MonitorConfig", "ParallelConfig", "REDACTED", "REPO_ROOT", "RESUME_EXACT_KEYS", "RunConfig",
           "TOKENIZER_FILES", "TrainConfig", "_default_alerts", "anticipates", "config_from_dict", "describe_hf_models_with",
           "effective_zero_stage", "expert_slots", "is_frozen", "load_config", "mesh_shape", "reads_token_files",
           "redact_text", "redact_url", "redacted", "redacted_yaml", "snapshot_in_thread", "to_dict", "to_yaml",
           "tokenizer_source", "validate"]
