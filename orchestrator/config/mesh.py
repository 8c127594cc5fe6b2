"""The parallel, memory and cluster sections: the device mesh, what each device holds, where devices run; and
the rules derived from them once for everyone (mesh_shape, expert_slots, effective_zero_stage)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from orchestrator.config.base import ConfigError, Root, _choice, _positive


@dataclass
class ParallelConfig:
    """The device mesh: cluster.num_devices = expert_parallel x data-parallel degree (orchestrator/parallel/mesh.py)."""
    expert_parallel: int = 0          # expert-parallel degree: devices one MoE layer's experts are split over; 0: the
                                      # largest divisor of num_devices that divides num_experts. The rest of the
                                      # devices is data parallelism (each group of expert_parallel devices a replica)
    # Speed (docs/speed.md): every option computes what it does without it (float64 equality in the tests).
    shared_expert_overlap: bool = True   # the shared expert computed while the dispatch all_to_all is in flight
                                      # (Megatron-Core's moe_shared_expert_overlap)
    dispatch_chunks: int = 2          # an MoE layer's local tokens split into this many chunks: chunk c's all_to_all
                                      # is in flight while chunk c-1's experts compute; 1: one exchange per layer
    grouped_gemm: bool = True         # the experts of a device as one grouped matmul (torch's grouped_mm) where the
                                      # device and dtype support it (float32, bfloat16, float16), the loop over
                                      # experts elsewhere (float64); false: always the loop
    overlap_grad_reduce: bool = True  # replicated gradients (dense ones at ZeRO 0-1, experts over the "dp"
                                      # dimension) all-reduced in buckets while the backward still runs (torch DDP's
                                      # scheme); false: one all-reduce after the whole backward
    grad_bucket_mb: float = 25.0      # size of one gradient bucket (MiB; torch DDP's bucket_cap_mb)
    router_dtype: str = "float32"     # float32: the router's logits, scores and top-k in float32 under bf16 autocast
                                      # (Megatron-Core's moe_router_dtype=fp32) | auto: in the autocast dtype
    pipelined_driver: bool = True     # the driver submits step n+1 before it handles step n's record, sinks, alerts
                                      # and status, and queues it behind step n before step n comes back when
                                      # nothing about it depends on how step n ends (docs/speed.md); a lag of one
                                      # step: a fault found late still rewinds to a state before the faulty step;
                                      # false: lock-step
    snapshot_serialize: str = "auto"  # where an in-memory snapshot goes into the object store: thread (copied in
                                      # the step loop, into pinned memory on a GPU, then serialized from a thread of
                                      # its own while the next step runs) | inline (serialized before the next step
                                      # starts, no extra copy on CPU) | auto: thread with GPUs, inline on CPU (where
                                      # the copy costs what the thread saves: docs/speed.md)


@dataclass
class MemoryConfig:
    """The memory puzzle: what each device holds (orchestrator/memory/plan.py predicts it; `python -m orchestrator plan`)."""
    zero_stage: int = 0               # 0: replicate dense state | 1: + optimizer states sharded | 2: + gradients
                                      # | 3: + parameters (FSDP full shard); dense over all devices, experts over
                                      # their data-parallel dimension
    activation_checkpointing: str = "none"  # none | selective (recompute attention and expert MLPs; routing and
                                      # all_to_all outputs kept) | full (recompute each block from its input)
    offload_optimizer: bool = False   # GPU only: AdamW states in host memory (torch FSDP2 CPUOffloadPolicy)


BIND_MODES = ("auto", "rank", "none")   # cluster.bind_cores (orchestrator/device/cores.py)


@dataclass
class ClusterConfig:
    num_devices: int = 2
    address: Optional[str] = None  # Ray address to join; None: RAY_ADDRESS, a live local cluster, or a new one
    placement_strategy: str = "PACK"   # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    cpus_per_device: float = 1.0   # fractional values share cores on a laptop
    use_gpu: bool = False          # one GPU bundle per device
    gpus_per_device: float = 1.0   # with use_gpu: below 1 several devices share a GPU (nccl cannot: they use gloo)
    backend: str = "auto"          # auto (nccl with GPUs, else gloo) | gloo | nccl
    torch_threads: int = 0         # 0: max(1, floor(cpus_per_device))
    bind_cores: str = "auto"       # auto (CPU devices: each bound to cores of its own while a host has no more devices
                                   # than cores) | rank (always) | none (the OS moves them): device/cores.py
    device_memory_gb: float = 0.0  # memory budget of one device the plan must fit (GiB); 0: a GPU's total memory,
                                   # no check on CPU
    start_timeout_s: float = 180.0
    step_timeout_s: float = 300.0
    collective_timeout_s: float = 300.0


def mesh_shape(cfg: Root) -> tuple[int, int]:
    """(expert-parallel degree, data-parallel degree) of the device mesh; their product is cluster.num_devices.
    parallel.expert_parallel=0 takes the largest divisor of num_devices that divides num_experts (8 experts on 4
    devices: EP 4; 2 experts on 4 devices: EP 2 x DP 2; 8 experts on 16 devices: EP 8 x DP 2)."""
    world, ep = cfg.cluster.num_devices, cfg.parallel.expert_parallel
    if not ep:
        ep = math.gcd(world, cfg.model.num_experts)
    return ep, max(1, world // ep)


def expert_slots(cfg: Root) -> int:
    """Expert slots per device of each MoE layer: its share of the experts plus its share of the redundant ones
    (experts are split over the expert-parallel dimension; data-parallel replicas hold the same slots)."""
    ep, _ = mesh_shape(cfg)
    return (cfg.model.num_experts + cfg.balance.redundant_experts) // ep


def snapshot_in_thread(cfg: Root) -> bool:
    """Is an in-memory snapshot serialized from the devices' snapshot thread (parallel.snapshot_serialize)?"""
    how = cfg.parallel.snapshot_serialize
    return how == "thread" or (how == "auto" and cfg.cluster.use_gpu)


def effective_zero_stage(cfg: Root, world: int | None = None) -> int:
    """The ZeRO stage the devices run: memory.zero_stage over several devices, 0 on one (there is nothing to shard
    state over; a user's zero_stage there is refused as idle, a default resolves to 0). `world`: the devices of
    this run when it is not cluster.num_devices (the single-process reference, a test's shard)."""
    world = cfg.cluster.num_devices if world is None else world
    return cfg.memory.zero_stage if world > 1 else 0


def _validate_mesh(cfg: Root) -> None:
    m, c, t, mem = cfg.model, cfg.cluster, cfg.train, cfg.memory
    _positive(cfg, ["parallel.expert_parallel", "cluster.device_memory_gb"], allow_zero=True)
    _positive(cfg, ["train.micro_batches", "parallel.dispatch_chunks", "parallel.grad_bucket_mb"])
    _choice("parallel.router_dtype", cfg.parallel.router_dtype, ("float32", "auto"))
    _choice("parallel.snapshot_serialize", cfg.parallel.snapshot_serialize, ("auto", "thread", "inline"))
    _choice("cluster.bind_cores", c.bind_cores, BIND_MODES)
    ep = cfg.parallel.expert_parallel
    if ep and (c.num_devices % ep or m.num_experts % ep):
        raise ConfigError(f"parallel.expert_parallel={ep} must divide both cluster.num_devices={c.num_devices} (the "
                          f"rest is data parallelism) and model.num_experts={m.num_experts} (every device of an "
                          f"expert-parallel group holds the same number of experts); 0 picks "
                          f"{math.gcd(c.num_devices, m.num_experts)}")
    if mem.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"memory.zero_stage={mem.zero_stage} must be 0 (replicate), 1 (shard optimizer states), "
                          f"2 (+ gradients) or 3 (+ parameters)")
    _choice("memory.activation_checkpointing", mem.activation_checkpointing, ("none", "selective", "full"))
    local = t.global_batch_size // c.num_devices
    if t.micro_batches > 1 and local % t.micro_batches:
        raise ConfigError(f"train.micro_batches={t.micro_batches} does not divide each device's slice of the batch "
                          f"(train.global_batch_size={t.global_batch_size} / cluster.num_devices={c.num_devices} = "
                          f"{local} sequences): choose a divisor of {local}")
    if t.micro_batches > 1 and cfg.balance.aux_loss_coeff and cfg.balance.aux_loss_scope != "sequence":
        raise ConfigError(f"balance.aux_loss_coeff={cfg.balance.aux_loss_coeff} with train.micro_batches="
                          f"{t.micro_batches}: the Switch loss over balance.aux_loss_scope={cfg.balance.aux_loss_scope} "
                          f"multiplies each expert's token count over the whole step by its router probabilities, so "
                          f"its gradient in the first micro-batch needs counts of the last; use "
                          f"balance.aux_loss_scope=sequence or balance.seq_aux_loss_coeff (per sequence: exact under "
                          f"micro-batching), balance.bias_update_speed, or train.micro_batches=1")
    if mem.zero_stage >= 2 and c.use_gpu and (c.backend == "gloo" or c.gpus_per_device < 1):
        raise ConfigError(f"memory.zero_stage={mem.zero_stage} on GPUs that talk over gloo (cluster.backend="
                          f"{c.backend}, cluster.gpus_per_device={c.gpus_per_device:g}): FSDP2 shards on the device "
                          f"type of its mesh, and gloo's is the CPU; give every device a GPU of its own with nccl "
                          f"(cluster.gpus_per_device=1, cluster.backend=auto), or memory.zero_stage=1")
    _, dp = mesh_shape(cfg)
    if mem.zero_stage >= 2 and dp > 1:
        for key, value in (("model.expert_dim", m.expert_dim), ("model.dim", m.dim)):
            if value % dp:
                raise ConfigError(f"{key}={value} is not divisible by the data-parallel degree {dp} (cluster."
                                  f"num_devices={c.num_devices} / expert_parallel {mesh_shape(cfg)[0]}): at "
                                  f"memory.zero_stage={mem.zero_stage} each expert is split over the data-parallel "
                                  f"devices along model.expert_dim (w1, w3) and model.dim (w2), evenly (FSDP2 cannot "
                                  f"split dim 1 unevenly); choose a multiple of {dp}, another "
                                  f"parallel.expert_parallel, or memory.zero_stage=1")
    b = cfg.balance
    if dp > 1:
        for key, value in (("redundant_experts", b.redundant_experts), ("replace_every", b.replace_every),
                           ("replace_on_imbalance", b.replace_on_imbalance)):
            if value:
                raise ConfigError(f"balance.{key}={value} with data parallelism (cluster.num_devices={c.num_devices} "
                                  f"= expert_parallel {mesh_shape(cfg)[0]} x data parallel {dp}): expert "
                                  f"re-placement and replicas work on expert-parallel-only layouts; set "
                                  f"parallel.expert_parallel={c.num_devices} (with model.num_experts a multiple of "
                                  f"it), or remove balance.{key}")
