"""The root of the typed config: one section per component (each in its own module, its checks beside it)."""
from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.config.balance import BalanceConfig
from orchestrator.config.data import DataConfig
from orchestrator.config.faults import FaultConfig
from orchestrator.config.mesh import ClusterConfig, MemoryConfig, ParallelConfig
from orchestrator.config.model import ModelConfig
from orchestrator.config.monitor import MonitorConfig
from orchestrator.config.rl import RLConfig
from orchestrator.config.train import CheckpointConfig, RunConfig, TrainConfig


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    rl: RLConfig = field(default_factory=RLConfig)
