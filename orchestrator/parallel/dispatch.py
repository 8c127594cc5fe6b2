"""Expert-parallel token dispatch and combine over `all_to_all` with uneven splits (dropless).

Device d of W holds slots [d*El, (d+1)*El) of each MoE layer (El slots per device; the MoE layer maps
expert ids to slots by its placement, so here an "expert" is a slot). Each device routes its
own tokens, sorts the routed copies by expert (so the copies bound for one device are contiguous),
tells every device how many copies per expert it will send (one small all_to_all of counts), sends
the copies (all_to_all, uneven splits: any count, zero included), regroups what arrived by local
expert, and after the experts ran sends the results back the same way (combine).

Shape legend: N local tokens, K top-k, M copies (sorted by global expert, before sending),
R copies received by this device, D model dim, E experts, El local experts, W devices.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from orchestrator.model.moe import DispatchMeta, LocalTokenDispatcher, permute_by_expert, unpermute_and_combine
from orchestrator.parallel.groups import CLOCK


def summed_counts(counts_E: torch.Tensor) -> torch.Tensor:
    """Tokens routed to each expert by all devices (for balancing losses over the global batch, which spans every
    device: expert- and data-parallel ones alike)."""
    total_E = counts_E.clone()
    with CLOCK.collective("all_reduce counts (world)"):
        dist.all_reduce(total_E)
    return total_E


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the all_to_all with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        with CLOCK.collective("all_to_all (ep)"):
            dist.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits,
                                   group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """all_to_all_single over `group` (None: the default group), differentiable."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllTokenDispatcher:
    """Drop-in for `LocalTokenDispatcher` when the layer's expert slots are split over the devices of `group`
    (the mesh's "ep" dimension; None: the default group). The balancing losses' global counts are summed over
    every device (the default group): the global batch spans the data-parallel replicas too."""

    def __init__(self, world: int, group=None):
        self.world, self.group = world, group

    def dispatch(self, x_ND, experts_NK, num_experts):
        if num_experts % self.world:
            raise ValueError(f"{num_experts} expert slots cannot be split evenly over {self.world} devices")
        W, El = self.world, num_experts // self.world
        x_MD, counts_E, token_idx_M, order_M = permute_by_expert(x_ND, experts_NK, num_experts)
        recv_counts = torch.empty_like(counts_E)
        with CLOCK.collective("all_to_all counts (ep)"):
            dist.all_to_all_single(recv_counts, counts_E, group=self.group)          # [source device, local expert], flattened
        recv_WEl = recv_counts.view(W, El)
        in_splits = counts_E.view(W, El).sum(1).tolist()
        out_splits = recv_WEl.sum(1).tolist()
        x_RD = all_to_all(x_MD, out_splits, in_splits, self.group)
        # Arrived grouped by source then expert; the experts want them grouped by expert.
        local_expert_R = torch.repeat_interleave(torch.arange(El, device=x_RD.device).repeat(W),
                                                 recv_WEl.flatten().to(x_RD.device))
        regroup_R = torch.argsort(local_expert_R, stable=True)
        meta = DispatchMeta(token_idx_M, order_M, extra=(regroup_R, in_splits, out_splits))
        return x_RD[regroup_R], recv_WEl.sum(0).tolist(), counts_E, meta

    def global_counts(self, counts_E):
        return summed_counts(counts_E)

    def group_counts(self, counts_E):
        """Counts summed over this device's expert-parallel group (the devices of its all_to_all), for
        balance.aux_loss_scope=ep_group."""
        total_E = counts_E.clone()
        with CLOCK.collective("all_reduce counts (ep)"):
            dist.all_reduce(total_E, group=self.group)
        return total_E

    def combine(self, y_RD, gates_NK, meta, num_tokens):
        regroup_R, in_splits, out_splits = meta.extra
        y_back_RD = y_RD[torch.argsort(regroup_R)]
        y_MD = all_to_all(y_back_RD, in_splits, out_splits, self.group)
        return unpermute_and_combine(y_MD, gates_NK, meta, num_tokens)


class DataParallelLocalDispatcher(LocalTokenDispatcher):
    """Every expert on every device (expert-parallel degree 1, several data-parallel devices): dispatch stays local,
    but the global batch spans the devices, so the balancing losses' global counts are summed over all of them.
    Each device is an expert-parallel group of its own: group_counts are its own (LocalTokenDispatcher's)."""

    def global_counts(self, counts_E):
        return summed_counts(counts_E)


def apply_expert_parallel(model: torch.nn.Module, world: int, group=None, data_parallel: bool = False) -> None:
    """Route every MoE layer of `model` through the all_to_all dispatcher over `group` of `world` devices (the
    expert-parallel degree). World 1: nothing to dispatch; with `data_parallel` (other devices hold the same
    experts and other tokens) counts for the balancing losses are still summed over every device."""
    from orchestrator.model.moe import ExpertSlots

    for module in model.modules():
        if isinstance(module, ExpertSlots) and world > 1:
            module.dispatcher = AllToAllTokenDispatcher(world, group)
        elif isinstance(module, ExpertSlots) and data_parallel:
            module.dispatcher = DataParallelLocalDispatcher()
