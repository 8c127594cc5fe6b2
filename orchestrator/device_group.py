"""The device actors of a run: a placement group with one bundle per device (and per warm standby), one
DeviceActor per rank, the process group over them, and replacing some of them while the others live on.

Ranks are fixed (rank r holds experts [r*El, (r+1)*El)); bundles are not: a standby that takes over
rank r brings its own bundle, and the bundle r had is handed to a new standby. Ray moves the bundles
of a node that died to a live node, so replacements for a lost node start wherever it put them.
"""
from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.config import Config
from orchestrator.device import DeviceActor
from orchestrator.errors import RunError
from orchestrator.parallel.groups import pick_backend

log = logging.getLogger(__name__)
# A thread of its own for progress(), so that it answers while a step is stuck; everything else runs in order.
RemoteDevice = ray.remote(concurrency_groups={"watch": 1})(DeviceActor)


def get(refs: list[Any], timeout_s: float, what: str) -> list[Any]:
    """ray.get with a deadline; a timeout or a dead actor becomes a RunError saying what was awaited."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise RunError(f"timed out after {timeout_s:.0f}s waiting for the devices to {what}") from None
    except RayActorError as e:
        raise RunError(f"a device actor died while trying to {what}: {e}") from e


class DeviceGroup:
    def __init__(self, cfg: Config):
        self.cfg, self.world = cfg, cfg.cluster.num_devices
        self.actors: list[Any] = []
        self.info: list[dict[str, Any]] = []                 # pid, node_id, ip, gpu_ids of each rank's actor
        self.restarts: list[int] = [0] * self.world          # replacements of each rank's actor so far
        self.bundle_of: list[int] = list(range(self.world))  # placement-group bundle of each rank
        self.standby: list[tuple[Any, int, Any]] = []        # (actor, bundle, info ref) of warm spares
        self.pg = None

    @property
    def backend(self) -> str:
        return pick_backend(self.cfg.cluster.backend, self.cfg.cluster.use_gpu)

    def node_of(self, rank: int) -> str | None:
        return self.info[rank].get("node_id") if 0 <= rank < len(self.info) else None

    def start(self) -> None:
        """Placement group, one actor per rank (and the standbys), the process group."""
        c, spares = self.cfg.cluster, self.cfg.faults.standby
        bundle = {"CPU": c.cpus_per_device, **({"GPU": 1} if c.use_gpu else {})}
        self.pg = placement_group([dict(bundle) for _ in range(self.world + spares)], strategy=c.placement_strategy)
        try:
            ray.get(self.pg.ready(), timeout=c.start_timeout_s)
        except GetTimeoutError:
            standby = f" plus {spares} standby" if spares else ""
            raise RunError(f"could not place {self.world} devices{standby} of {bundle} each with strategy "
                           f"{c.placement_strategy} within {c.start_timeout_s:.0f}s; the cluster has "
                           f"{ray.cluster_resources()}. Lower cluster.num_devices, cluster.cpus_per_device or "
                           f"faults.standby, or add nodes") from None
        self.actors = [self.new_actor(i) for i in range(self.world)]
        for b in range(self.world, self.world + spares):
            self.spawn_standby(b)
        self.info = get([a.info.remote() for a in self.actors], c.start_timeout_s, "start device actors")
        self.form_group()

    def new_actor(self, bundle: int) -> Any:
        c = self.cfg.cluster
        threads = c.torch_threads or max(1, int(c.cpus_per_device))
        return RemoteDevice.options(
            num_cpus=c.cpus_per_device, num_gpus=1 if c.use_gpu else 0, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle)
        ).remote(threads)

    def spawn_standby(self, bundle: int) -> None:
        actor = self.new_actor(bundle)
        self.standby.append((actor, bundle, actor.info.remote()))

    def form_group(self) -> None:
        """(Re)form the process group over the current actors; rank 0's node hosts the rendezvous."""
        if self.world == 1:
            return
        c = self.cfg.cluster
        port = get([self.actors[0].free_port.remote()], c.start_timeout_s, "pick a rendezvous port")[0]
        addr = self.info[0]["ip"]
        get([a.join_group.remote(self.backend, addr, port, rank, self.world, c.collective_timeout_s)
             for rank, a in enumerate(self.actors)], c.start_timeout_s, "form the process group")

    def replace(self, ranks: list[int], timeout_s: float) -> None:
        """Kill the actors of `ranks` and put replacements in their place (started, not yet in the group)."""
        infos: dict[int, Any] = {}
        for rank in ranks:
            try:
                ray.kill(self.actors[rank], no_restart=True)
            except Exception:  # already gone
                pass
            self.actors[rank], infos[rank] = self._replacement(rank, timeout_s)
            self.restarts[rank] += 1
        for rank in ranks:
            self.info[rank] = infos[rank] or get([self.actors[rank].info.remote()], timeout_s, "start a replacement")[0]

    def _replacement(self, rank: int, timeout_s: float) -> tuple[Any, dict[str, Any] | None]:
        """A warm standby that answers (its bundle becomes the rank's, a new standby takes the old one), else
        a new actor in the rank's bundle."""
        while self.standby:
            actor, bundle, info_ref = self.standby.pop(0)
            try:
                info = ray.get(info_ref, timeout=timeout_s)
                ray.get(actor.progress.remote(), timeout=5.0)  # still alive (its node may have gone since)
            except Exception as e:
                log.warning("standby actor in bundle %d is gone (%s); starting another", bundle, type(e).__name__)
                self.spawn_standby(bundle)
                continue
            old, self.bundle_of[rank] = self.bundle_of[rank], bundle
            self.spawn_standby(old)
            return actor, info
        return self.new_actor(self.bundle_of[rank]), None

    def dead_ranks(self) -> list[int]:
        """Devices that are gone or do not answer (their watch thread answers even mid-step)."""
        asks = {a.progress.remote(): rank for rank, a in enumerate(self.actors)}
        ready, _ = ray.wait(list(asks), num_returns=len(asks), timeout=5.0)
        dead = []
        for ref, rank in asks.items():
            try:
                if ref not in ready:
                    raise TimeoutError
                ray.get(ref)
            except Exception:
                dead.append(rank)
        return dead

    def shutdown(self) -> None:
        for a in self.actors + [s[0] for s in self.standby]:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already dead: nothing to do
                pass
        self.actors, self.standby = [], []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None


__all__ = ["DeviceGroup", "RemoteDevice", "get"]
