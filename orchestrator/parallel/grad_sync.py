"""Gradient synchronisation for replicated (dense) parameters, and the global gradient norm."""
from __future__ import annotations

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
    for p, g, used in zip(params, summed, anywhere.tolist()):
        if not used:
            p.grad = None
        elif p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


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
