"""torch.distributed pieces of expert parallelism: groups, dispatch/combine, gradient sync. No Ray."""
from orchestrator.parallel.dispatch import AllToAllTokenDispatcher, all_to_all, apply_expert_parallel
from orchestrator.parallel.grad_sync import allreduce_dense_grads, clip_, sum_of_squares
from orchestrator.parallel import groups

__all__ = ["AllToAllTokenDispatcher", "all_to_all", "apply_expert_parallel", "allreduce_dense_grads", "clip_",
           "sum_of_squares", "groups"]
