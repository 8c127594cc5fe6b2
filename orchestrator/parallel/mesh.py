"""The device mesh: cluster.num_devices = expert-parallel degree (ep) x data-parallel degree (dp).

Device rank r sits at (dp_index, ep_index) = (r // ep, r % ep) of a [dp, ep] torch DeviceMesh. Which
collective runs over which dimension (torchtitan's dense mesh [dp_shard] and sparse mesh [efsdp, ep]):

  world (every device)   dense gradients (all-reduce at ZeRO stage 0/1, FSDP2 reduce-scatter at 2/3), the
                         step's statistics, the balancing losses' global token counts, ZeRO-1 of dense states
  "ep" (same dp index)   token dispatch and combine (all_to_all): one copy of every expert per ep group
  "dp" (same ep index)   expert gradients (all-reduce, or FSDP2 reduce-scatter at stage 2/3), ZeRO-1 of
                         expert states: devices holding the same experts

With dp == 1 the "ep" dimension is the whole world and this is plain expert parallelism, as before the mesh.
A mesh holds process groups of the default group it was built on: re-forming the default group (recovery)
means building the mesh again (`build_mesh`), and anything sharded on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass
class Mesh:
    world: int
    rank: int
    ep: int
    dp: int
    device_mesh: Any = None   # torch DeviceMesh [dp, ep] (None in one process)
    world_mesh: Any = None    # 1-D DeviceMesh over every device (FSDP2's dense mesh)

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def ep_group(self) -> Any:
        """The group token dispatch runs over: the default group when it is the whole world."""
        return None if self.dp == 1 or self.device_mesh is None else self.device_mesh.get_group("ep")

    @property
    def dp_group(self) -> Any:
        """The group holding the same experts (None: only this device)."""
        return None if self.dp == 1 else self.device_mesh.get_group("dp")

    @property
    def dp_mesh(self) -> Any:
        return None if self.device_mesh is None else self.device_mesh["dp"]


def build_mesh(world: int, rank: int, ep: int, device_type: str = "cpu") -> Mesh:
    """The mesh of a run of `world` devices with expert-parallel degree `ep`, on the default process group
    (collective: every rank calls it). One process: a Mesh without process groups."""
    dp = world // ep
    if world == 1 or not dist.is_initialized():
        return Mesh(world, rank, ep, dp)
    from torch.distributed.device_mesh import init_device_mesh

    device_mesh = init_device_mesh(device_type, (dp, ep), mesh_dim_names=("dp", "ep"))
    world_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("world",)) if dp > 1 else device_mesh["ep"]
    return Mesh(world, rank, ep, dp, device_mesh, world_mesh)


_current: tuple[Any, Mesh] | None = None   # (the default group it was built on, the mesh)


def current_mesh(world: int, rank: int, ep: int, device_type: str = "cpu") -> Mesh:
    """This process's mesh over the current default group, built on first use (collective: every rank of the
    group must get here together, as when they join it: see DeviceActor.join_group). A group re-formed since
    (recovery) gets a new mesh: the old one's process groups died with the old default group."""
    global _current
    if world == 1 or not dist.is_initialized():
        return Mesh(world, rank, ep, world // ep)
    world_group = dist.group.WORLD
    if _current is None or _current[0] is not world_group or (_current[1].world, _current[1].ep) != (world, ep):
        _current = (world_group, build_mesh(world, rank, ep, device_type))
    return _current[1]
