"""The single-process reference run: the oracle every distributed run is checked against."""
from __future__ import annotations

import copy

import torch

from orchestrator.config import Config, mesh_shape
from orchestrator.data import Corpus, load_corpus
from orchestrator.device.actor import DeviceShard, StepReport


def reference_run(cfg: Config, steps: int | None = None, corpus: Corpus | None = None
                  ) -> tuple[list[StepReport], dict[str, torch.Tensor]]:
    """Train `cfg` in this process on one device holding every expert, whole batches, no ZeRO sharding and no
    activation checkpointing; reports and final parameters."""
    groups = mesh_shape(cfg)[1]   # the run's expert-parallel groups (its data-parallel degree)
    cfg = copy.deepcopy(cfg)
    cfg.cluster.num_devices = 1
    # The oracle shares no sharding, recomputation or accumulation code with the runs it checks.
    cfg.parallel.expert_parallel, cfg.memory.zero_stage, cfg.train.micro_batches = 0, 0, 1
    cfg.memory.activation_checkpointing = "none"
    corpus = corpus or load_corpus(cfg.data)
    shard = DeviceShard(cfg, rank=0, world=1, train_tokens=corpus.train, val_tokens=corpus.val)
    for m in shard.model.moe_layers():   # aux_loss_scope=ep_group: this process holds every group's rows, in order
        m.ep_groups = m.local_ep_groups = groups
    reports = [shard.train_step(step) for step in range(1, (steps or cfg.train.steps) + 1)]
    return reports, shard.global_parameters()
