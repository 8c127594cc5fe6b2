"""Gradient synchronisation for replicated (dense) parameters, and the global gradient norm."""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from orchestrator.parallel.groups import CLOCK


def allreduce_dense_grads(params: list[torch.nn.Parameter], group=None, name: str = "all_reduce grads (world)"
                          ) -> None:
    """Sum gradients over `group` (None: the default group, for dense parameters; the mesh's "dp" group for
    experts), in one flat buffer (one collective per step).

    The loss on every device is already divided by the global token count, so the sum is the
    gradient of the global mean loss: no extra division by the world size.

    A parameter that got no gradient on any device (unused by the step's forward, or fed only through
    non-differentiable ops, such as DeepSeek-V4's indexer) keeps `grad = None`, as on one device: AdamW then
    leaves it and its state alone (no weight decay, no moments), so N devices update what one does. One that got
    a gradient on some devices only gets the sum (zeros counted for the others), as torch DDP does. Whether a
    gradient exists travels in the same buffer (one flag per parameter), so it is still one collective.
    """
    params = [p for p in params if p.requires_grad]   # frozen ones (train.freeze) never have a gradient
    if not params:   # a model without MoE layers has no expert gradients to sum
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    had = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = _flatten_dense_tensors(grads + [had])
    with CLOCK.collective(name):
        dist.all_reduce(flat, group=group)
    *summed, anywhere = _unflatten_dense_tensors(flat, grads + [had])
    _apply_sums(params, summed, anywhere.tolist())


def sum_of_squares(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Sum of squared gradient entries this device holds (a sharded gradient: its local shard), in float64."""
    from orchestrator.parallel.sharding import local

    sq = [local(p.grad.detach()).double().pow(2).sum() for p in params if p.grad is not None]
    return torch.stack(sq).sum() if sq else torch.zeros((), dtype=torch.float64)


def clip_(params: list[torch.nn.Parameter], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients so their global norm is at most max_norm (no-op when max_norm is 0)."""
    if max_norm <= 0:
        return
    from orchestrator.parallel.sharding import local

    coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            g = local(p.grad)
            g.mul_(coef.to(g.device, g.dtype))


def _apply_sums(params: list[torch.nn.Parameter], summed: list[torch.Tensor], anywhere: list[float]) -> None:
    """Write summed gradients back, the "had a gradient anywhere" rule of allreduce_dense_grads: a parameter no
    device gave a gradient keeps None."""
    for p, g, used in zip(params, summed, anywhere):
        if not used:
            p.grad = None
        elif p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def grad_buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list[list[torch.nn.Parameter]]:
    """`params` (trainable, each once) in reverse registration order, roughly the order a backward produces their
    gradients, cut into buckets of at most `bucket_bytes` each (a larger parameter alone in its own), a new bucket
    wherever the dtype or device changes (one flat buffer per bucket). Source: torch DDP's bucketing
    (torch/nn/parallel/distributed.py, `_compute_bucket_assignment_by_size` with bucket_cap_mb), without DDP's
    smaller first bucket."""
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        last = buckets[-1][-1] if buckets else None
        if last is None or size + nbytes > bucket_bytes or (last.dtype, last.device) != (p.dtype, p.device):
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def grad_group(ranks: list[list[int]] | None = None):
    """A process group of its own for gradient buckets, on the current default group (collective: every rank of
    the default group calls it alike). `ranks`: the partition into groups (the mesh's "dp" groups); None: one group
    of every rank. Returns the group this rank is in.

    Why a group of its own: buckets are launched from the backward as their gradients arrive, while the backward
    runs collectives of its own on the default group (the MoE layers' all_to_all, again in a recomputation under
    activation checkpointing). Where a parameter gets no gradient on some devices, its bucket goes out later there
    than elsewhere, so on a shared group the two kinds could be issued in different orders on different ranks;
    on a group of their own the buckets are ordered only among themselves, in bucket order on every rank."""
    if ranks is None:
        return dist.new_group(list(range(dist.get_world_size())))
    mine = None
    for r in ranks:
        g = dist.new_group(r)
        if dist.get_rank() in r:
            mine = g
    return mine


class OverlappedGradReducer:
    """allreduce_dense_grads in buckets, overlapped with the backward (torch DDP's scheme, with its no_sync).

    Every trainable parameter of `params` gets a post-accumulate-grad hook. In an armed backward (`arm(True)`:
    the step's last backward pass; earlier micro-batches only accumulate, as under DDP's no_sync) a bucket
    (grad_buckets) whose every parameter has its gradient is summed over `group` with an asynchronous flat
    all_reduce, strictly in bucket order: a ready bucket waits for the ones before it, so every rank issues the
    same collectives in the same order even where a parameter gets no gradient on some ranks (that bucket, and
    the ones after it, then go out in `finish`). `finish()`, after the backward: what is left goes out (zeros for
    a parameter without a gradient; the last bucket also carries one flag per parameter, did it get a gradient
    on this rank), every bucket is waited for, and the sums are written back with
    allreduce_dense_grads's rule: a parameter no rank gave a gradient keeps None; the others get the sum (zeros
    counted for the ranks without one). The sums are those of allreduce_dense_grads: the same numbers added
    over the same ranks (only the buffer they travel in differs).

    The buckets travel on a process group of their own (grad_group; see there why), over `ranks` (grad_group's
    partition; None: every rank), made on first use (`arm` or `finish`, which every rank calls at the same point
    of a step) and made again when the default group has been re-formed since (recovery): building a reducer is
    no collective, and one built before a re-formation goes on working after it. Collectives per step: one per
    bucket.
    """

    def __init__(self, params: list[torch.nn.Parameter], bucket_bytes: int, ranks: list[list[int]] | None = None,
                 name: str = "all_reduce grads (world, overlapped)"):
        seen: set[int] = set()
        trainable = [p for p in params if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
        self.buckets = grad_buckets(trainable, bucket_bytes)
        self.params = [p for b in self.buckets for p in b]   # bucket order
        self.ranks, self.name = ranks, name
        self.group, self._on = None, None   # the buckets' group, and (a weak reference) the default group it was
                                            # made on: holding a destroyed default group can abort the process's exit
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._handles = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]
        self.launched_in_backward = 0   # of the last finished step: buckets that went out during its backward
        self._reset(armed=False)

    def _reset(self, armed: bool) -> None:
        self._armed = armed
        self._missing = [len(b) for b in self.buckets]   # parameters of each bucket still without this pass's hook
        self._fired: set[int] = set()
        self._next = 0                                    # the next bucket to launch
        self._flight: list[tuple[torch.Tensor, object]] = []   # (flat buffer, async work) of each launched bucket

    def arm(self, last: bool) -> None:
        """Before a backward pass: `last` (the step's last pass) launches buckets from its hooks; otherwise its
        gradients only accumulate. Anything left from a step that did not finish (it raised) is dropped."""
        if self.params:
            self._ensure_group()
        self._reset(armed=last)

    def _ensure_group(self) -> None:
        """The buckets' group, on the current default group (made again after a re-formation). Inside a collective
        for the step clock: a gloo group's making waits for its peers, as a collective does."""
        if self._on is None or self._on() is not dist.group.WORLD:
            with CLOCK.collective("new_group grads"):
                self.group, self._on = grad_group(self.ranks), weakref.ref(dist.group.WORLD)

    def _ready(self, p: torch.nn.Parameter) -> None:
        """Post-accumulate-grad hook: p.grad holds p's whole gradient of this backward."""
        if not self._armed:
            return
        if id(p) in self._fired:   # a backward accumulates into a parameter once (non-reentrant checkpointing too)
            raise RuntimeError(f"gradient hook of a parameter {tuple(p.shape)} fired twice in one backward: "
                               f"bucketed gradient all-reduce cannot tell when its gradient is complete")
        self._fired.add(id(p))
        self._missing[self._bucket_of[id(p)]] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch()

    def _launch(self) -> None:
        """The next bucket's flat all_reduce, asynchronous (zeros for a parameter without a gradient here). The last
        bucket carries the flags too, one per parameter: did it get a gradient here. They are known when it goes
        out: from a hook, every parameter has had its hook in this pass (the buckets before it went out first); from
        `finish`, the backward is over. (A count in the bucket's dtype: in bfloat16 it may round, never to 0.)"""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[self._next]]
        if self._next == len(self.buckets) - 1:
            grads.append(torch.tensor([float(p.grad is not None) for p in self.params], dtype=grads[0].dtype,
                                      device=grads[0].device))
        flat = _flatten_dense_tensors(grads)
        self._flight.append((flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        self._next += 1

    def finish(self) -> None:
        """After the backward: launch the buckets left, wait for all, write the sums back."""
        if not self.params:
            return
        self._ensure_group()
        self._armed = False
        self.launched_in_backward = len(self._flight)
        while self._next < len(self.buckets):
            self._launch()
        with CLOCK.collective(self.name):
            for _, work in self._flight:
                work.wait()
        anywhere = self._flight[-1][0][-len(self.params):].tolist()   # the flags, summed over the ranks
        at = 0
        for bucket, (flat, _) in zip(self.buckets, self._flight):
            summed = _unflatten_dense_tensors(flat[:sum(p.numel() for p in bucket)], bucket)
            _apply_sums(bucket, summed, anywhere[at:at + len(bucket)])
            at += len(bucket)
        self._reset(armed=False)

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for h in self._handles:
            h.remove()
        self._handles = []
