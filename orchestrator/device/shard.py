"""One device's shard, plain torch: its slice of the model, its optimizer, its data, its training step.

No Ray here: a single-process reference run is a DeviceShard with world=1, and `DeviceActor` (device.py)
is the thin Ray-facing object that holds one.

A step on every device: forward over its slice of the global batch (MoE layers exchange tokens
with all_to_all) -> loss summed over local tokens / global token count -> backward -> all-reduce
dense gradients -> one all-reduce of the step's statistics (loss, expert-grad norm, expert load)
-> global grad-norm clip -> AdamW. The returned `StepReport` is small: numbers and a few ints.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F

from orchestrator.device.arena import Arena
from orchestrator.checkpoint.shard import Snapshot, restore_from_files, restore_from_snapshots, take_snapshot
from orchestrator.config import Config, anticipates, effective_zero_stage, expert_slots, is_frozen, mesh_shape
from orchestrator.data.source import make_stream
from orchestrator.model.build import build_any_model
from orchestrator.model.balancing import update_expert_bias
from orchestrator.memory.measure import ActivationMeter, state_bytes
from orchestrator.model.layers import upcast
from orchestrator.model.mtp import mtp_loss_sums, mtp_targets
from orchestrator.parallel import allreduce_dense_grads, apply_expert_parallel, clip_, sum_of_squares
from orchestrator.parallel.grad_sync import OverlappedGradReducer
from orchestrator.parallel.groups import CLOCK
from orchestrator.parallel.mesh import current_mesh
from orchestrator.parallel.sharding import Optimizers, is_sharded, local, reshard, shard_model, whole
from orchestrator.experts.placement import ExpertPlacement
from orchestrator.device.anticipate import PREFIX as ANTICIPATE, Anticipator, replaying
from orchestrator.device.schedule import lr_of


class InjectedCrash(RuntimeError):
    """An exception raised on purpose inside a step (fault injection)."""


@dataclass
class StepReport:
    step: int
    rank: int
    loss: float                    # mean loss over the global batch
    grad_norm: float               # global gradient norm before clipping
    lr: float
    tokens: int                    # trained tokens in the global batch (SFT: assistant tokens; else every one)
    compute_time_s: float          # time this device spent inside the step
    expert_load: list[list[int]]   # [MoE layer][expert]: global tokens routed to the expert this step
    device_load: list[list[int]] = field(default_factory=list)  # [MoE layer][device]: token copies its experts got
    collective_s: float = 0.0      # of compute_time_s, time inside collectives (mostly waiting for peers)
    skipped: str | None = None     # why the update was not applied: nonfinite | loss_spike | grad_spike
    local_nonfinite: bool = False  # this device's own loss was non-finite (who caused a non-finite step)
    positions: int = 0             # token positions the step computed, padding and prompts included (MFU's work)
    aux_loss: float = 0.0          # balancing losses (all MoE layers, global batch), not part of `loss`
    dropped: int = 0               # token copies dropped by capacity (all MoE layers, global batch)
    rss_bytes: int = 0             # this device's process: resident host memory after the step
    device_mem_bytes: int = 0      # GPU memory allocated by torch (0 on CPU)
    memory: dict[str, int] = field(default_factory=dict)  # bytes this device holds: params, grads, optimizer (local
                                   # shards, after the update), activations_peak (of this step), rss (orchestrator/memory/measure.py)
    extra: dict[str, float] = field(default_factory=dict)   # an RL step's own numbers (device/rl.py), the world's
    mtp_losses: list[float] = field(default_factory=list)  # per MTP depth k=1..D: mean CE over the global batch's
                                   # depth-k targets (model/mtp.py); trained on (times mtp_weight/D), not part of `loss`
    started_at: float = 0.0        # wall clock (time.time()) when the device's train_step call began (device/steptimes.py)
    ended_at: float = 0.0          # ... and when it ended (0: not timed, e.g. a DeviceShard stepped directly)
    idle_s: float = 0.0            # since the device's previous train_step ended: the driver's work, other calls
    other_calls_s: float = 0.0     # of idle_s, time in the device's other calls (snapshot, validation, ...)
    pid: int = field(default_factory=os.getpid)


@dataclass
class _Passes:
    """What a step's forward/backward passes add up on this device (DeviceShard._forward_backward)."""
    loss_tokens: int                 # trained tokens in the global batch: the loss is their mean
    loss_sum: torch.Tensor           # float64: summed LM loss of this device's slice
    aux_sum: torch.Tensor            # float64: its balancing losses
    routed: list[torch.Tensor]       # [MoE layer] float64 tokens routed to each expert
    received_by_layer: list[float]   # [MoE layer] token copies this device's experts received
    meter: ActivationMeter           # the passes' activation peak
    dropped: int = 0                 # token copies dropped by capacity
    mtp_sum: torch.Tensor | None = None   # float64 [mtp_depth]: each MTP depth's summed CE of this device's slice

    def add(self, part: torch.Tensor, aux: torch.Tensor | None, moe: list, device: torch.device,
            mtp_parts: list[torch.Tensor] | None = None) -> None:
        """Add one micro-batch's loss sum, balancing losses, expert loads (and MTP depths' loss sums)."""
        self.loss_sum = self.loss_sum + part.detach().double()
        if mtp_parts:
            self.mtp_sum = self.mtp_sum + torch.stack([p.detach().double() for p in mtp_parts])
        if aux is not None:
            self.aux_sum = self.aux_sum + aux.detach().double()
        for j, m in enumerate(moe):
            self.routed[j] += m.last_tokens_per_expert.double().to(device)
            self.received_by_layer[j] += float(m.last_received)
            self.dropped += m.last_dropped


def _reject(loss: float, grad_norm: float, guard: dict[str, float]) -> str | None:
    """Why an update must not be applied, or None."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return "nonfinite"
    if guard.get("skip_batch"):  # an alert rule with action=skip rewound to before this step: skip its batch
        return "alert"
    if guard.get("max_loss") and loss > guard["max_loss"]:
        return "loss_spike"
    if guard.get("max_grad_norm") and grad_norm > guard["max_grad_norm"]:
        return "grad_spike"
    return None


def corrupted_batch(inputs_BT: torch.Tensor, targets_BT: torch.Tensor, vocab_size: int, seed: int, step: int,
                    rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The injected `spike` fault's batch: every input and trained target replaced by a uniformly random token
    (targets that are not trained, -100, stay so), drawn from a generator keyed by (seed, step, rank): the same
    corruption whenever the fault strikes that step on that device."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
    inputs = torch.randint(0, vocab_size, inputs_BT.shape, generator=g, dtype=inputs_BT.dtype)
    noise = torch.randint(0, vocab_size, targets_BT.shape, generator=g, dtype=targets_BT.dtype)
    return inputs, torch.where(targets_BT == -100, targets_BT, noise)


def autocast_dtype(setting: str, dtype: str, device_type: str, bf16_supported: bool) -> torch.dtype | None:
    """The dtype the forward autocasts to (train.mixed_precision), or None: `auto` means bf16 on a GPU that
    supports it and nothing on CPU; `bf16` also on CPU, not on a GPU without bf16; float64 runs never."""
    if setting == "none" or dtype == "float64" or (device_type == "cpu" and setting == "auto"):
        return None
    return torch.bfloat16 if device_type == "cpu" or bf16_supported else None


def _bf16_native() -> bool:
    """bf16 in hardware (Ampere and later); torch's default also says yes where it is only emulated (V100, T4)."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def rss_bytes() -> int:
    """Resident memory of this process (psutil)."""
    return psutil.Process().memory_info().rss


class DeviceShard:
    def __init__(self, cfg: Config, rank: int, world: int, train_tokens: np.ndarray, val_tokens: np.ndarray):
        self.cfg, self.rank, self.world = cfg, rank, world
        # The process RNG is a function of (seed, rank) too, so what a checkpoint saves of it is reproducible.
        torch.manual_seed(cfg.seed * 1_000_003 + rank)
        self.device = torch.device("cuda", 0) if cfg.cluster.use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.autocast = autocast_dtype(cfg.train.mixed_precision, cfg.train.dtype, self.device.type,
                                       self.device.type == "cuda" and _bf16_native())
        # The mesh: experts are split over the "ep" dimension, each group of ep devices a data-parallel replica.
        ep = mesh_shape(cfg)[0] if world > 1 else 1
        self.mesh = current_mesh(world, rank, ep, self.device.type)
        self.zero_stage = effective_zero_stage(cfg, world)
        # The initial placement over the ep ranks: experts [e*El, (e+1)*El), then replicas in the redundant slots.
        initial = ExpertPlacement.initial(cfg.model.num_experts, ep, expert_slots(cfg) if ep > 1 else None)
        self.load_stats: dict = {}   # a Hugging Face checkpoint: what this device read of it (model/hf_load.py)
        self.model = build_any_model(cfg.model, cfg.seed, initial.slots[self.mesh.ep_rank], cfg.balance, self.device,
                                     cfg.train.dtype, self.load_stats, parallel=cfg.parallel)
        if cfg.balance.router_aux_loss_coeff:   # a transformers model's own router auxiliary loss
            self.model.use_router_aux_loss(cfg.balance.router_aux_loss_coeff)
        apply_expert_parallel(self.model, ep, self.mesh.ep_group, data_parallel=world > ep,
                              chunks=cfg.parallel.dispatch_chunks, shared_overlap=cfg.parallel.shared_expert_overlap)
        for m in self.model.moe_layers():
            m.set_placement(initial.slots, self.mesh.ep_rank)
        for name, p in self.model.named_parameters():   # train.freeze: no gradient, so no AdamW state either
            if is_frozen(name, cfg.train.freeze):
                p.requires_grad_(False)
        if cfg.memory.activation_checkpointing != "none":
            from orchestrator.model.checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(self.model, cfg.memory.activation_checkpointing)
        shard_model(self.model, self.mesh, self.zero_stage, cfg.memory.offload_optimizer)
        # RL, one step off-policy: the next step's batch (sampled before this step's update), kept in rank 0's
        # snapshots and checkpoints so that a rewind or a resume trains on what the first pass did (data/rl.py)
        self.rl_pending: dict[str, torch.Tensor] = {}
        self.reference = None   # RL's frozen reference policy (rl.kl_coeff), held and sharded like the policy
        if cfg.data.task == "rl" and cfg.rl.kl_coeff:
            from orchestrator.device.rl import build_reference

            self.reference = build_reference(self, initial.slots[self.mesh.ep_rank], initial.slots)
        self.dense_params = [p for _, p in self.model.dense_parameters()]
        self.expert_params = [p for _, p in self.model.expert_parameters()]
        self._grad_reducers = self._overlapped_grad_reducers()
        t = cfg.train
        self.optim = Optimizers(self.dense_params, self.expert_params, self.mesh, self.zero_stage, lr=t.lr,
                                betas=(t.beta1, t.beta2), weight_decay=t.weight_decay)
        self.arena = Arena()   # parameters and moments as views of a few buffers, once snapshots are taken (CPU)
        # Token arrays (BatchStream) or SFT samples (val_tokens None: SFTBatchStream, masked labels, loss_tokens)
        self.data = make_stream(cfg, train_tokens, val_tokens, world, rank)
        self.global_tokens = t.global_batch_size * cfg.data.seq_len
        for m in self.model.moe_layers():  # balancing losses are shares of a loss over the global batch
            m.global_tokens = self.global_tokens
            m.ep_groups = self.mesh.dp       # aux_loss_scope=ep_group: the batch's groups; this device is in one
        # multi-token prediction (model/mtp.py): depth k has seq_len - k positions (and targets) a row
        self.mtp_tokens = mtp_targets(t.global_batch_size, cfg.data.seq_len, cfg.model.mtp_depth)
        for module, n in zip(getattr(self.model, "mtp", ()), self.mtp_tokens):
            if hasattr(module.block.ffn, "global_tokens"):   # an MoE block
                module.block.ffn.global_tokens = n
        # Injected faults (see DeviceActor.inject): each strikes the next step, or the next `slow_steps`.
        self.crash_next_step = self.hang_next_step = self.nan_next_step = self.spike_next_step = False
        self.slow_steps, self.slow_delay_s = 0, 0.0
        self.anticipator = None   # anticipatory routing (device/anticipate.py): its cached ids are state, as rl_pending
        if anticipates(cfg):
            self.anticipator = Anticipator(cfg.balance.anticipatory_delay, cfg.balance.anticipatory_routing, world,
                                           t.steps)

    @property
    def holds_groups(self) -> bool:
        """Does this shard hold process groups of the default group it was built on (ZeRO optimizers, FSDP2, the
        mesh's sub-groups)? Then it must be built again when the group is re-formed."""
        return self.world > 1 and (self.zero_stage > 0 or self.mesh.dp > 1)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            with CLOCK.collective("all_reduce stats (world)"):
                dist.all_reduce(t)
        return t

    def _loss_sum(self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor, positions_BT: torch.Tensor | None = None,
                  valid_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Summed cross-entropy over the targets that are not -100 (SFT: the assistant tokens). Packed SFT rows
        carry per-document position ids (a transformers model then attends within each document only); `valid`
        marks what is not padding (a transformers model leaves padding out of expert loads and its router loss)."""
        extra = {k: v.to(self.device) for k, v in (("position_ids_BT", positions_BT), ("valid_BT", valid_BT))
                 if v is not None}   # (only SFT rows of a transformers model carry them: validate refuses the rest)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            logits_BTV = self.model(inputs_BT.to(self.device), **extra)
        return F.cross_entropy(upcast(logits_BTV.flatten(0, 1)), targets_BT.to(self.device).flatten(), reduction="sum",
                               ignore_index=-100)

    def _mtp_loss_sums(self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> tuple[torch.Tensor,
                                                                                        list[torch.Tensor]]:
        """(summed main cross-entropy, each MTP depth's summed cross-entropy) of a pretraining slice, one forward
        (model/mtp.py: depth k's targets are targets_BT[:, k:])."""
        targets_BT = targets_BT.to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            logits_BTV, mtp_BTV = self.model(inputs_BT.to(self.device), mtp=True)

        def ce(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(upcast(logits_NV), targets_N, reduction="sum", ignore_index=-100)
        return ce(logits_BTV.flatten(0, 1), targets_BT.flatten()), mtp_loss_sums(mtp_BTV, targets_BT, ce)

    def _mtp_loss(self, parts: list[torch.Tensor]) -> torch.Tensor | float:
        """This slice's share of the MTP loss, mtp_weight/D * sum_k L_k, L_k = depth k's CE summed over the
        global batch / its target count (DeepSeek-V3 eq. 25; model/mtp.py)."""
        if not parts:
            return 0.0
        return self.cfg.model.mtp_weight / len(parts) * sum(p / n for p, n in zip(parts, self.mtp_tokens))

    def _batch(self, step: int, val: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                             torch.Tensor | None]:
        """(inputs, targets, position ids, padding mask) of a train step or validation batch: the last two only for
        SFT rows (position ids only when packed, where they restart per document; the mask only for a transformers
        model)."""
        batch = self.data.val_batch(step) if val else self.data.train_batch(step)
        if len(batch) == 2:
            return (*batch, None, None)
        inputs, targets, positions = batch
        hf = getattr(self.model, "hf", None) is not None
        valid = (self.data.val_valid(step) if val else self.data.train_valid(step)) if hf else None
        return inputs, targets, positions if self.cfg.data.pack else None, valid

    def train_step(self, step: int, guard: dict[str, float] | None = None, batch: Any = None) -> StepReport:
        """One step. The update is not applied (and `skipped` says why) when the global loss or gradient
        norm is non-finite, or above `guard`'s max_loss / max_grad_norm: every device sees the same
        all-reduced values, so all of them decide alike. With train.micro_batches = m the device's slice runs
        in m forward/backward passes whose gradients add up to the whole slice's (each loss is a share of the
        global mean; the balancing losses are per sequence or per token, so they split the same way)."""
        if batch is not None:   # an RL step (data.task=rl): its batch comes from the rollouts (device/rl.py)
            from orchestrator.device.rl import rl_step

            return rl_step(self, step, batch, guard)
        t0 = self._begin(step)
        moe = self.model.moe_layers()
        if self.anticipator is None:
            return self._update_from(step, moe, self._forward_backward(step, moe), guard, t0)
        self.anticipator.begin(step, guard)
        self.anticipator.route_ahead(self, step)   # with this step's parameters, for step + delay
        report = self._update_from(step, moe, self._forward_backward(step, moe), guard, t0)
        report.extra.update(self.anticipator.reported(step))
        return report

    def _begin(self, step: int) -> float:
        """A step begins: its clock, train mode, an injected straggler's delay; when it began."""
        t0 = time.perf_counter()
        CLOCK.start(step)
        self.model.train()
        self._before_backward(False)   # the gradient buckets' group made now (first step, or after re-forming),
                                       # before any fault a step may inject: every device gets here together
        if self.slow_steps:  # injected straggler: extra work outside any collective
            self.slow_steps -= 1
            time.sleep(self.slow_delay_s)
        return t0

    def _update_from(self, step: int, moe: list, passes: "_Passes", guard: dict[str, float] | None, t0: float,
                     lr: float | None = None) -> StepReport:
        """The gradients of `passes` synced, the step's statistics all-reduced, the update applied unless rejected;
        the step's report."""
        self._sync_grads(moe)
        stats, grad_norm = self._global_stats(moe, passes)
        counts = 4 + len(moe) * self.world  # where the per-expert counts start
        mtp_at = stats.numel() - self.cfg.model.mtp_depth   # where they end: the MTP depths' loss sums follow
        mtp_losses = [(s / n).item() for s, n in zip(stats[mtp_at:], self.mtp_tokens)]
        stats = stats[:mtp_at]
        loss, norm = stats[0].item() / passes.loss_tokens, grad_norm.item()
        skipped = _reject(loss, norm, guard or {})
        local_nonfinite = skipped == "nonfinite" and not math.isfinite(passes.loss_sum.item())
        lr = lr_of(self.cfg.train, step) if lr is None else lr
        if skipped is None:
            self._update(moe, grad_norm, lr, stats[counts:])
        memory = {**state_bytes(self.model, self.optim), "activations_peak": passes.meter.peak_bytes,
                  "rss": rss_bytes()}
        self.optim.zero_grad()
        load = stats[counts:].nan_to_num().round().long().view(len(moe), -1).tolist() if moe else []
        device_load = stats[4:counts].round().long().view(len(moe), self.world).tolist() if moe else []
        CLOCK.set_phase("idle")
        mem = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        return StepReport(rss_bytes=memory["rss"], device_mem_bytes=mem, memory=memory, step=step, rank=self.rank, loss=loss,
                          grad_norm=norm, lr=lr, tokens=passes.loss_tokens, positions=self.global_tokens,
                          compute_time_s=time.perf_counter() - t0, expert_load=load, device_load=device_load,
                          aux_loss=stats[2].item(), dropped=int(stats[3].item()),
                          collective_s=CLOCK.collective_s, skipped=skipped, local_nonfinite=local_nonfinite,
                          mtp_losses=mtp_losses)

    def _forward_backward(self, step: int, moe: list) -> _Passes:
        """The step's forward and backward passes, one per micro-batch, gradients accumulating; what they add up."""
        inputs_BT, targets_BT, positions_BT, valid_BT = self._batch(step)
        if self.spike_next_step:   # injected (fault kind spike): a corrupted batch
            self.spike_next_step = False
            inputs_BT, targets_BT = corrupted_batch(inputs_BT, targets_BT, self.cfg.model.vocab_size,
                                                    self.cfg.seed, step, self.rank)
        # The loss is the mean over the global batch's trained tokens (SFT: assistant tokens only; else all).
        loss_tokens = self.data.loss_tokens(step)
        if valid_BT is not None:   # a transformers model's router loss: its rows are the batch's tokens, not padding
            real = self.data.real_tokens(step)
            for m in moe:   # (and the sequence-wise losses' rows: the global batch's, padding or not)
                m.global_tokens, m.global_sequences = real, self.cfg.train.global_batch_size
        micro = self.cfg.train.micro_batches
        passes = self._new_passes(loss_tokens, moe)
        replays = self.anticipator.replays(step, micro) if self.anticipator is not None else None
        with passes.meter, replaying(self.model, replays, self.device) as replay:
            pos = positions_BT.chunk(micro) if positions_BT is not None else [None] * micro
            val = valid_BT.chunk(micro) if valid_BT is not None else [None] * micro
            for i, (x_BT, y_BT, p_BT, v_BT) in enumerate(zip(inputs_BT.chunk(micro), targets_BT.chunk(micro), pos,
                                                             val)):
                replay(i)   # anticipatory routing: the ids cached for this micro-batch (None: the router's choice)
                if self.cfg.model.mtp_depth:   # multi-token prediction: its loss trained on, reported apart
                    part, mtp_parts = self._mtp_loss_sums(x_BT, y_BT)
                else:
                    part, mtp_parts = self._loss_sum(x_BT, y_BT, p_BT, v_BT), []
                if i == 0:
                    part = self._inject_faults(step, part)
                aux = self.model.aux_loss()  # balancing losses: trained on, reported apart from the LM loss
                lm_loss = part / loss_tokens + self._mtp_loss(mtp_parts)
                self._before_backward(i == micro - 1)
                (lm_loss if aux is None else lm_loss + aux).backward()
                passes.add(part, aux, moe, self.device, mtp_parts)
        return passes

    def _new_passes(self, loss_tokens: int, moe: list) -> _Passes:
        """Nothing added up yet; the loss is the sum over the world divided by `loss_tokens`."""
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        return _Passes(loss_tokens=loss_tokens, loss_sum=zero, aux_sum=zero,
                       routed=[torch.zeros(self.cfg.model.num_experts, dtype=torch.float64, device=self.device)
                               for _ in moe],
                       received_by_layer=[0.0] * len(moe), meter=ActivationMeter(self.model, self.device),
                       mtp_sum=torch.zeros(self.cfg.model.mtp_depth, dtype=torch.float64, device=self.device))

    def _global_stats(self, moe: list, passes: _Passes) -> tuple[torch.Tensor, torch.Tensor]:
        """(the step's numbers summed over the world, the global gradient norm). The stats vector: [0] loss sum,
        [1] sharded gradients' squared norm, [2] balancing losses, [3] dropped copies, then [4:counts] token
        copies each MoE layer's experts on each device received, then [counts:] tokens routed to each expert, then
        the last mtp_depth: each MTP depth's loss sum."""
        received = torch.zeros(len(moe), self.world, dtype=torch.float64, device=self.device)
        received[:, self.rank] = torch.tensor(passes.received_by_layer, dtype=torch.float64)
        replicated_sq, sharded_sq = self._grad_sum_of_squares(moe)
        # float64: exact token counts, and the loss sum as precise as the model's dtype allows.
        stats = torch.cat([passes.loss_sum.view(1), sharded_sq.view(1).to(self.device), passes.aux_sum.view(1),
                           torch.tensor([float(passes.dropped)], dtype=torch.float64, device=self.device),
                           received.flatten(), *passes.routed, passes.mtp_sum])
        self._all_reduce(stats)
        return stats, torch.sqrt(replicated_sq.to(self.device) + stats[1])

    def _update(self, moe: list, grad_norm: torch.Tensor, lr: float, counts: torch.Tensor) -> None:
        """Clip, step the optimizer at `lr`, and move the experts' routing biases by the step's global `counts`."""
        clip_(self.dense_params + self.expert_params, grad_norm, self.cfg.train.grad_clip)
        self.optim.set_lr(lr)
        self.optim.step()
        if self.cfg.balance.bias_update_speed:
            for m, counts_E in zip(moe, counts.view(len(moe), -1)):
                if m.router.expert_bias is not None:   # (a hash-routed layer of a transformers model has none)
                    update_expert_bias(m.router.expert_bias, counts_E, self.cfg.balance.bias_update_speed)

    def _inject_faults(self, step: int, loss_sum: torch.Tensor) -> torch.Tensor:
        """Faults injected into this step (DeviceActor.inject), struck between forward and backward."""
        if self.nan_next_step:  # injected: this device's loss (and so every gradient) becomes non-finite
            self.nan_next_step = False
            loss_sum = loss_sum * float("nan")
        if self.crash_next_step:  # injected fault: fails between forward and backward, peers mid-step
            self.crash_next_step = False
            raise InjectedCrash(f"injected crash in step {step} on device {self.rank}")
        if self.hang_next_step:  # injected: stops answering between forward and backward; peers wait in all_to_all
            if self.hang_next_step == "collective":  # as a device stuck inside a collective call would look
                with CLOCK.collective("all_to_all (hung, injected)"):
                    while True:
                        time.sleep(1.0)
            CLOCK.set_phase("hung (injected)")
            while True:
                time.sleep(1.0)
        return loss_sum

    def _sync_grads(self, moe: list) -> None:
        """Sum gradients where torch's sharding did not already: dense over the world, experts over "dp" (ZeRO
        stages 0 and 1; FSDP2 reduce-scatters at 2 and 3), and the replicas of an expert (expert-parallel only)."""
        if self.world == 1:
            return
        overlapped = self._grad_reducers   # parallel.overlap_grad_reduce: buckets already in flight, the rest now
        if self.zero_stage < 2:
            if "dense" in overlapped:
                overlapped["dense"].finish()
            else:
                allreduce_dense_grads(self.dense_params)
        if self.mesh.dp > 1 and not any(is_sharded(p) for p in self.expert_params):
            if "experts" in overlapped:
                overlapped["experts"].finish()
            else:
                allreduce_dense_grads(self.expert_params, self.mesh.dp_group, "all_reduce expert grads (dp)")
        if any(max(m.copies) > 1 for m in moe):
            self._sum_replica_grads(moe)

    def _overlapped_grad_reducers(self) -> dict[str, OverlappedGradReducer]:
        """parallel.overlap_grad_reduce: reducers that sum gradients in buckets of parallel.grad_bucket_mb while the
        backward runs, wherever _sync_grads all-reduces: "dense" over the world (ZeRO stages 0 and 1; FSDP2
        overlaps its own reduce-scatter at 2 and 3), "experts" over "dp" (unless sharded). None in one process or
        with the option off. Each makes its process group on first use (no collective here)."""
        par = self.cfg.parallel
        if self.world == 1 or not par.overlap_grad_reduce:
            return {}
        cap = int(par.grad_bucket_mb * 2**20)
        out = {}
        if self.zero_stage < 2:
            out["dense"] = OverlappedGradReducer(self.dense_params, cap)
        if self.mesh.dp > 1 and not any(is_sharded(p) for p in self.expert_params):
            ep, dp = self.mesh.ep, self.mesh.dp   # the "dp" groups: devices (d, e) for d < dp at each ep index e
            out["experts"] = OverlappedGradReducer(self.expert_params, cap,
                                                   [[e + ep * d for d in range(dp)] for e in range(ep)],
                                                   "all_reduce expert grads (dp, overlapped)")
        return out

    def _before_backward(self, last: bool) -> None:
        """Before each backward pass of a step's update: `last` (its last micro-batch) lets the gradient hooks
        launch the buckets' all-reduces; earlier passes only accumulate (DDP's no_sync)."""
        for reducer in self._grad_reducers.values():
            reducer.arm(last)

    def _grad_sum_of_squares(self, moe: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared norm of the gradients every device holds whole and alike, this device's share of the rest): the
        second all-reduced over the world plus the first is the squared norm of the model's gradient. Dense
        gradients are whole and alike at stages 0 and 1, shards at 2 and 3; of experts, every logical expert is
        counted once: its primary replica, on the first data-parallel replica unless its gradient is sharded."""
        dense = sum_of_squares(self.dense_params).double()
        sharded_dense = any(is_sharded(p) for p in self.dense_params)
        experts_sharded = any(is_sharded(p) for p in self.expert_params)
        experts = (self._expert_sum_of_squares(moe) if experts_sharded or self.mesh.dp_rank == 0
                   else torch.zeros((), dtype=torch.float64))
        if sharded_dense:
            return torch.zeros((), dtype=torch.float64), dense + experts.to(dense.device)
        return dense, experts

    def _sum_replica_grads(self, moe: list) -> None:
        """Each replica of an expert got the gradient of its share of the expert's tokens: sum them (one all_reduce
        of the replicated experts' rows, zeros where a device holds no replica), so every replica holds the
        expert's whole gradient and takes the same AdamW update: replicas stay identical."""
        parts: list[torch.Tensor] = []
        targets: list[tuple[torch.nn.Parameter, list[tuple[int, int]]]] = []
        for m in moe:
            row = {e: i for i, e in enumerate(e for e, n in enumerate(m.copies) if n > 1)}
            mine = [(j, row[e]) for j, e in enumerate(m.experts.expert_ids) if e in row]
            for p in m.experts.parameters():
                if not p.requires_grad:   # frozen (train.freeze): no gradient to sum
                    continue
                buf = p.new_zeros((len(row), *p.shape[1:]))
                for j, i in mine:
                    if p.grad is not None:
                        buf[i] += p.grad[j]
                parts.append(buf)
                targets.append((p, mine))
        if not parts:
            return
        flat = torch.cat([b.flatten() for b in parts])
        with CLOCK.collective("all_reduce replica grads (ep)"):
            dist.all_reduce(flat)
        offset = 0
        for (p, mine), buf in zip(targets, parts):
            summed = flat[offset:offset + buf.numel()].view_as(buf)
            offset += buf.numel()
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            for j, i in mine:
                p.grad[j].copy_(summed[i])

    @staticmethod
    def _expert_sum_of_squares(moe: list) -> torch.Tensor:
        """This device's share of the squared expert-gradient norm: every logical expert counted once (its
        primary replica), so the all-reduced sum is the norm of the model's gradient."""
        sq = []
        for m in moe:
            for p in m.experts.parameters():
                if p.grad is not None:
                    sq.append(local(p.grad.detach())[m.primary_mask].double().pow(2).sum())
        return torch.stack(sq).sum() if sq else torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def evaluate(self, num_batches: int) -> float:
        """Mean loss over `num_batches` global batches of the validation split."""
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        for i in range(num_batches):
            total += self._loss_sum(*self._batch(i, val=True)).double()
            tokens += self.data.val_loss_tokens(i)
        reshard(self.model)   # stage 2 keeps the unsharded parameters after a forward without backward
        return self._all_reduce(total.view(1)).item() / max(1, tokens)

    def snapshot(self, step: int, copy: bool = True) -> Snapshot:
        """This device's state after `step` in host memory (`copy=False`: CPU tensors viewed, not copied; only for a
        snapshot serialized before training goes on: checkpoint/shard.py take_snapshot)."""
        reshard(self.model)
        own = self.anticipator.state() if self.anticipator is not None else None
        arena = None
        if not copy and self.device.type == "cpu":   # its arrays pickle as slices of a few buffers (device/arena.py)
            self.arena.ensure(self.expert_params + self.dense_params, self.optim)
            arena = self.arena
        return take_snapshot(self.model, self.optim, self.rank, step, self.mesh.dp_rank, self.rl_pending, own, copy,
                             arena)

    def restore(self, manifest: dict[str, Any], read, where: str) -> None:
        reshard(self.model)
        self._extras(restore_from_files(self.model, self.optim, self.rank, manifest, read, where))

    def restore_snapshots(self, snapshots: list[Snapshot]) -> None:
        reshard(self.model)
        self._extras(restore_from_snapshots(self.model, self.optim, self.rank, snapshots))

    def _extras(self, extras: dict[str, torch.Tensor]) -> None:
        """The run's own state a snapshot or checkpoint gave back: anticipatory routing's, then RL's pending batch."""
        if self.anticipator is not None:
            extras = self.anticipator.take(extras)
        self.rl_pending = {k: v for k, v in extras.items() if not k.startswith(ANTICIPATE)}

    def set_placement(self, placement: list[list[list[int]]]) -> None:
        """Hold, in every MoE layer, the experts `placement[layer][ep rank]` (dispatch follows at once; the
        weights and optimizer state are the caller's to restore, from snapshots holding those experts). The
        number of slots per device is fixed by the config: a placement only says which expert sits in which."""
        for m, slots in zip(self.model.moe_layers(), placement):
            m.set_placement(slots, self.mesh.ep_rank)

    def global_parameters(self) -> dict[str, torch.Tensor]:
        """The parameters keyed by global name; routed experts one entry per global id. Sharded parameters are
        gathered whole (collective: every device calls it)."""
        reshard(self.model)
        out = {name: whole(p).cpu().clone() for name, p in self.model.dense_parameters()}
        for name, p in self.model.expert_parameters():
            full = whole(p).cpu()
            for j, gid in enumerate(self.model.expert_ids_of(name)):
                out[f"{name}[{gid}]"] = full[j].clone()
        return out
