"""Expert-parallel token dispatch and combine over `all_to_all` with uneven splits (dropless).

Device d of W holds slots [d*El, (d+1)*El) of each MoE layer (El slots per device; the MoE layer maps
expert ids to slots by its placement, so here an "expert" is a slot). Each device routes its
own tokens, sorts the routed copies by expert (so the copies bound for one device are contiguous),
tells every device how many copies per expert it will send (one small all_to_all of counts), sends
the copies (all_to_all, uneven splits: any count, zero included), regroups what arrived by local
expert, and after the experts ran sends the results back the same way (combine).

`AllToAllTokenDispatcher.routed` runs that whole path overlapped (Megatron-Core's moe_shared_expert_overlap and
its chunked all-to-all pipelining): the local tokens are split into `chunks` chunks, every chunk's all_to_all is
launched asynchronously, the shared expert runs while they are in flight, chunk c's experts run while the later
chunks' dispatches and the earlier chunks' combines are in flight; backward overlaps the same way (each
all_to_all's gradient exchange is launched by one autograd node and waited for by the next). The counts of all
chunks cross in one all_to_all and come to the host once per layer. Under bf16/fp16 autocast the copies cross in
the autocast dtype (moe.wire_dtype) and the combine sums in float32.

Shape legend: N local tokens, K top-k, M copies (sorted by global expert, before sending),
R copies received by this device, D model dim, E experts, El local experts, W devices.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from orchestrator.model.moe import (DispatchMeta, LocalTokenDispatcher, Routed, combine_copies, count_ids,
                                    permute_by_expert, unpermute_and_combine, wire_dtype)
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


class _Pending:
    """One asynchronous all_to_all, shared by the autograd pair that launches (`_Launch`) and waits for (`_Wait`)
    it: forward launches in _Launch and waits in _Wait; backward launches the swapped exchange in _Wait's backward
    and waits in _Launch's. Holds the input until the exchange is done (the collective reads it meanwhile)."""

    def __init__(self, out_splits: list[int], in_splits: list[int], group):
        self.out_splits, self.in_splits, self.group = out_splits, in_splits, group
        self.work = self.held = self.out = None

    def launch(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        self.held = x.contiguous()
        self.out = x.new_empty((sum(out_splits), *x.shape[1:]))
        self.work = dist.all_to_all_single(self.out, self.held, output_split_sizes=out_splits,
                                           input_split_sizes=in_splits, group=self.group, async_op=True)
        return self.out

    def wait(self) -> torch.Tensor:
        with CLOCK.collective("all_to_all (ep)"):
            self.work.wait()
        out, self.work, self.held, self.out = self.out, None, None, None
        return out


class _Launch(torch.autograd.Function):
    """Launch `pending`'s all_to_all of x; returns the buffer it fills (read it only through `_Wait`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pending: _Pending) -> torch.Tensor:
        ctx.pending = pending
        return pending.launch(x, pending.out_splits, pending.in_splits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.pending.wait(), None   # the exchange _Wait.backward launched (of this very `grad`)


class _Wait(torch.autograd.Function):
    """Wait for `pending`'s all_to_all; the identity on its buffer."""

    @staticmethod
    def forward(ctx, buf: torch.Tensor, pending: _Pending) -> torch.Tensor:
        ctx.pending = pending
        return pending.wait().view_as(buf)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p = ctx.pending
        p.launch(grad, p.in_splits, p.out_splits)   # the swapped exchange, waited for by _Launch.backward
        return grad, None   # (passed on unchanged: autograd wants buf's shape; _Launch.backward ignores it)


def launch_all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None
                      ) -> tuple[torch.Tensor, _Pending]:
    """Start a differentiable all_to_all_single of x; `wait_all_to_all(buf, pending)` gives its result. Work done
    between the two overlaps the exchange (forward, and in backward the gradient's exchange overlaps the work
    autograd does between the two nodes)."""
    pending = _Pending(out_splits, in_splits, group)
    return _Launch.apply(x, pending), pending


def wait_all_to_all(buf: torch.Tensor, pending: _Pending) -> torch.Tensor:
    return _Wait.apply(buf, pending)


def chunk_sizes(n: int, chunks: int) -> list[int]:
    """n split into `chunks` consecutive parts, the first n % chunks one longer (torch.tensor_split's sizes)."""
    return [n // chunks + (1 if c < n % chunks else 0) for c in range(chunks)]


class AllToAllTokenDispatcher:
    """Drop-in for `LocalTokenDispatcher` when the layer's expert slots are split over the devices of `group`
    (the mesh's "ep" dimension; None: the default group). The balancing losses' global counts are summed over
    every device (the default group): the global batch spans the data-parallel replicas too.

    `chunks` (parallel.dispatch_chunks) and `shared_overlap` (parallel.shared_expert_overlap) shape `routed`;
    every device of the group must use the same values (they set which collectives run)."""

    def __init__(self, world: int, group=None, chunks: int = 1, shared_overlap: bool = True):
        if chunks < 1:
            raise ValueError(f"dispatch chunks must be at least 1, got {chunks}")
        self.world, self.group, self.chunks, self.shared_overlap = world, group, chunks, shared_overlap

    def routed(self, x_ND: torch.Tensor, slots_NK: torch.Tensor, gates_NK: torch.Tensor, num_slots: int,
               experts_fn, shared_fn=None) -> Routed:
        """The whole routed path of an MoE layer (see the module docstring): the same math as LocalTokenDispatcher's
        on all devices' tokens. x_ND [N, D], slots_NK [N, K] (int64; `num_slots`: dropped), gates_NK [N, K];
        experts_fn(x_MD, tokens_per_local_slot: list[int]) -> y_MD on copies grouped by local slot; shared_fn() -> the
        shared expert's output [N, D] (run while the dispatch is in flight with shared_overlap, after the combine
        without). One host sync: the counts of every chunk, exchanged in one all_to_all."""
        if num_slots % self.world:
            raise ValueError(f"{num_slots} expert slots cannot be split evenly over {self.world} devices")
        W, El, S, C = self.world, num_slots // self.world, num_slots, self.chunks
        N, K = slots_NK.shape
        sizes = chunk_sizes(N, C)
        dev = slots_NK.device
        # Sort every copy by (chunk, slot), dropped copies (slot S) last in their chunk: one argsort for all chunks.
        chunk_N = torch.repeat_interleave(torch.arange(C, device=dev), torch.tensor(sizes, device=dev), output_size=N)
        key_M = (chunk_N.unsqueeze(1) * (S + 1) + slots_NK).reshape(-1)
        order_M = torch.argsort(key_M, stable=True)
        counts_CS = count_ids(key_M, C * (S + 1)).view(C, S + 1)
        send_WCL = counts_CS[:, :S].reshape(C, W, El).transpose(0, 1).contiguous()
        recv_WCL = torch.empty_like(send_WCL)   # [source device, chunk, local slot]
        with CLOCK.collective("all_to_all counts (ep)"):
            dist.all_to_all_single(recv_WCL, send_WCL, group=self.group)
        host = torch.cat([counts_CS.reshape(-1), recv_WCL.reshape(-1)]).tolist()   # the layer's one host sync
        own = [host[c * (S + 1):(c + 1) * (S + 1)] for c in range(C)]
        recv = [[host[C * (S + 1) + (w * C + c) * El:C * (S + 1) + (w * C + c + 1) * El] for w in range(W)]
                for c in range(C)]   # recv[c][w][l]
        wire = wire_dtype(x_ND)
        x_wire_ND = x_ND.to(wire)
        kept_idx, launched, start = [], [], 0
        for c in range(C):
            kept = sum(own[c][:S])
            idx_M = order_M[start:start + kept]
            start += sizes[c] * K
            in_splits = [sum(own[c][w * El:(w + 1) * El]) for w in range(W)]
            out_splits = [sum(r) for r in recv[c]]
            kept_idx.append(idx_M)
            launched.append(launch_all_to_all(x_wire_ND[idx_M // K], out_splits, in_splits, self.group))
        shared_ND = shared_fn() if shared_fn is not None and self.shared_overlap else None
        combines = []
        for c in range(C):
            x_RD = wait_all_to_all(*launched[c])
            R = x_RD.shape[0]
            per_slot = [sum(recv[c][w][l] for w in range(W)) for l in range(El)]
            pending = launched[c][1]
            if W == 1 or El == 1:   # arrived grouped by slot already
                combines.append(launch_all_to_all(experts_fn(x_RD, per_slot).to(wire), pending.in_splits,
                                                  pending.out_splits, self.group))
                continue
            # Arrived grouped by source then slot; the experts want them grouped by slot.
            local_R = torch.repeat_interleave(torch.arange(El, device=dev).repeat(W), recv_WCL[:, c].reshape(-1),
                                              output_size=R)
            regroup_R = torch.argsort(local_R, stable=True)
            back_R = torch.empty_like(regroup_R).scatter_(0, regroup_R, torch.arange(R, device=dev))
            # (index_select: a permutation, 3x faster than x[idx] on a CPU; no duplicate rows, so its backward's
            # index_add has nothing to sum and stays deterministic on a GPU)
            y_RD = experts_fn(x_RD.index_select(0, regroup_R), per_slot)
            combines.append(launch_all_to_all(y_RD.to(wire).index_select(0, back_R), pending.in_splits,
                                              pending.out_splits, self.group))
        y_MD = torch.cat([wait_all_to_all(*pair) for pair in combines]) if C > 1 else wait_all_to_all(*combines[0])
        order_kept_M = torch.cat(kept_idx) if C > 1 else kept_idx[0]
        out_ND = combine_copies(y_MD, gates_NK.reshape(-1).index_select(0, order_kept_M), order_kept_M // K, N,
                                x_ND.dtype)
        if shared_fn is not None and not self.shared_overlap:
            shared_ND = shared_fn()
        received = sum(sum(sum(r) for r in recv[c]) for c in range(C))
        return Routed(out_ND, shared_ND, received, sum(sum(own[c][:S]) for c in range(C)))

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


def apply_expert_parallel(model: torch.nn.Module, world: int, group=None, data_parallel: bool = False,
                          chunks: int = 2, shared_overlap: bool = True) -> None:
    """Route every MoE layer of `model` through the all_to_all dispatcher over `group` of `world` devices (the
    expert-parallel degree), its routed path in `chunks` chunks (parallel.dispatch_chunks) and the shared expert
    overlapped with the dispatch when `shared_overlap` (parallel.shared_expert_overlap). World 1: nothing to
    dispatch; with `data_parallel` (other devices hold the same experts and other tokens) counts for the balancing
    losses are still summed over every device."""
    from orchestrator.model.moe import ExpertSlots

    for module in model.modules():
        if isinstance(module, ExpertSlots) and world > 1:
            module.dispatcher = AllToAllTokenDispatcher(world, group, chunks, shared_overlap)
        elif isinstance(module, ExpertSlots) and data_parallel:
            module.dispatcher = DataParallelLocalDispatcher()
