"""ZeRO stages over the device mesh, with torch's own implementations (no hand-written gather/scatter).

  stage 0  every device: dense parameters, gradients (all-reduced over the world) and AdamW moments; its
           experts' likewise (gradients all-reduced over "dp")
  stage 1  + AdamW moments partitioned: torch.distributed.optim.ZeroRedundancyOptimizer, dense parameters
           over the world, expert parameters over "dp" (whole parameters per device, torch's greedy split)
  stage 2  + gradients sharded: FSDP2 `fully_shard(reshard_after_forward=False)` (ZeRO-2/SHARD_GRAD_OP: the
           unsharded parameters live from forward to the end of backward; gradients are reduce-scattered)
  stage 3  + parameters sharded: FSDP2 `fully_shard(reshard_after_forward=True)` (ZeRO-3/FULL_SHARD)

FSDP2 shards dense parameters on dim 0 over the world (one unit per transformer block plus the root) and,
with data parallelism, the routed experts of each block over "dp" on dim 1 (the hidden or model dimension,
never the expert dimension: an expert count below the dp degree would be padded; torchtitan #1561).
Without data parallelism experts are left out of FSDP (`ignored_params`): nothing to shard them over.
Gradients are summed, not averaged (the loss is already a share of the global mean): FSDP2's divide factor
is 1 and ZeroRedundancyOptimizer sees gradients all-reduced by `grad_sync`.

Sources: Rajbhandari et al., "ZeRO" (arXiv 1910.02054) for the stages; torch FSDP2 and torchtitan
(`torchtitan/distributed/...parallelize`) for composing it with expert parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from orchestrator.parallel.mesh import Mesh


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this process holds: a DTensor's local shard, else `t` itself."""
    return t.to_local() if hasattr(t, "device_mesh") and hasattr(t, "to_local") else t


def is_sharded(p: torch.Tensor) -> bool:
    """A DTensor sharded over more than one device (its gradient is too)."""
    return hasattr(p, "device_mesh") and p.device_mesh.size() > 1


def whole(p: torch.Tensor) -> torch.Tensor:
    """The whole logical tensor of `p` (a sharded one gathered: a collective, every holder calls it), detached."""
    return (p.full_tensor() if is_sharded(p) else local(p)).detach()


def shard_model(model: nn.Module, mesh: Mesh, stage: int, offload: bool = False) -> None:
    """Apply FSDP2 for stages 2 and 3 (stages 0 and 1 leave the model as it is). Collective: every rank."""
    if stage < 2 or mesh.world == 1:
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
    from torch.distributed.tensor import Shard

    reshard = stage == 3
    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    blocks = model.blocks()   # (transformer block, its routed experts or None)
    ignored = None if mesh.dp > 1 else {p for _, e in blocks if e is not None for p in e.parameters()}
    for block, experts in blocks:
        if mesh.dp > 1 and experts is not None:
            fully_shard(experts, mesh=mesh.dp_mesh, reshard_after_forward=reshard,
                        shard_placement_fn=lambda p: Shard(1), offload_policy=policy)
        fully_shard(block, mesh=mesh.world_mesh, reshard_after_forward=reshard, offload_policy=policy,
                    ignored_params=ignored)
    fully_shard(model, mesh=mesh.world_mesh, reshard_after_forward=reshard, offload_policy=policy,
                ignored_params=ignored)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)   # gloo has no PREMUL_SUM (what a divide factor uses in fp32)


def reshard(model: nn.Module) -> None:
    """Put FSDP2's sharded parameters back on the modules (local, no collective). A forward without grad leaves a
    stage-2 model (reshard_after_forward=False) holding its unsharded parameters until the next backward: a
    snapshot or an evaluation then would see whole tensors that the optimizer's state is not keyed by."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class Optimizers:
    """The AdamW of one device, whole or ZeRO-partitioned: one interface for the step and for snapshots.

    `state_of(p)` is p's AdamW state if this device holds it (ZeRO-1: only for the parameters its partition
    owns; FSDP2: the local shards of the moments, as DTensors like p), else None. A parameter it owns may still
    have no state: AdamW creates it at the parameter's first gradient (one that never got one has none; a frozen
    parameter, `requires_grad=False`, is in no optimizer at all)."""

    def __init__(self, dense: list[nn.Parameter], experts: list[nn.Parameter], mesh: Mesh, stage: int, *,
                 lr: float, betas: tuple[float, float], weight_decay: float):
        kw = dict(lr=lr, betas=betas, eps=1e-8)
        dense = [p for p in dense if p.requires_grad]
        experts = [p for p in experts if p.requires_grad]
        if stage == 1 and mesh.world > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.optimizers: list[torch.optim.Optimizer] = [
                ZeroRedundancyOptimizer(_param_groups(dense, weight_decay), torch.optim.AdamW, **kw)]
            if experts and mesh.dp > 1:   # experts' states partitioned over the devices holding the same experts
                self.optimizers.append(ZeroRedundancyOptimizer(_param_groups(experts, weight_decay),
                                                               torch.optim.AdamW, process_group=mesh.dp_group, **kw))
            elif experts:                 # no other device holds these experts: nothing to partition them over
                self.optimizers.append(torch.optim.AdamW(_param_groups(experts, weight_decay), **kw))
        else:
            self.optimizers = [torch.optim.AdamW(_param_groups(dense + experts, weight_decay), **kw)]
        self._owner: dict[int, torch.optim.Optimizer] = {}
        self._partitioned: set[int] = set()
        self.steps_taken = 0   # updates applied (the same on every device: all skip or step alike); set on restore
        for opt in self.optimizers:
            inner = getattr(opt, "optim", opt)   # ZeroRedundancyOptimizer: the local AdamW of its partition
            for group in inner.param_groups:
                for p in group["params"]:
                    self._owner[id(p)] = inner
                    if inner is not opt:
                        self._partitioned.add(id(p))

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()
        self.steps_taken += 1

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def owns(self, p: nn.Parameter) -> bool:
        """Does this device hold p's AdamW state (or will, once it has stepped)?"""
        return id(p) in self._owner

    def partitioned(self, p: nn.Parameter) -> bool:
        """Is p's AdamW state on this device only (its ZeRO-1 partition owns it)?"""
        return id(p) in self._partitioned

    def state_of(self, p: nn.Parameter) -> dict[str, Any] | None:
        inner = self._owner.get(id(p))
        return None if inner is None else inner.state.get(p)

    def set_state(self, p: nn.Parameter, state: dict[str, Any] | None) -> None:
        inner = self._owner.get(id(p))
        if inner is None:
            return
        inner.state.pop(p, None)
        if state is not None:
            inner.state[p] = state

    def states(self) -> Iterator[dict[str, Any]]:
        for opt in self.optimizers:
            yield from getattr(opt, "optim", opt).state.values()

    @property
    def optimizer_step(self) -> int:
        """The optimizer steps taken, counted by this object, not read from a state: a device whose ZeRO-1 partition
        holds only parameters without a gradient has no state to read it from, and a parameter whose gradient
        came later, or not at every step, has a smaller count of its own (`step_of`)."""
        return self.steps_taken

    def step_of(self, p: nn.Parameter) -> int:
        """The step count of p's own AdamW state on this device (0: no state yet)."""
        state = self.state_of(p)
        return int(state["step"]) if state and "step" in state else 0


@dataclass
class Piece:
    """Which part of a logical tensor a device holds: rows [start, stop) of dim `dim` (dim None: all of it)."""
    dim: int | None = None
    start: int = 0
    stop: int = 0

    def suffix(self) -> str:
        return "" if self.dim is None else f"@{self.dim}:{self.start}:{self.stop}"

    def take(self, full: torch.Tensor) -> torch.Tensor:
        return full if self.dim is None else full.narrow(self.dim, self.start, self.stop - self.start)


def piece_of(p: torch.Tensor, drop_leading: bool = False) -> Piece:
    """The slice of p's logical tensor this device holds (`drop_leading`: of each row of dim 0, for the stacked
    experts [El, ...], whose logical tensors are per expert)."""
    if not is_sharded(p):
        return Piece()
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placement = p.placements[0]
    assert isinstance(placement, Shard), f"unexpected placement {placement}"
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    d = placement.dim
    return Piece(d - 1 if drop_leading else d, offset[d], offset[d] + shape[d])

