"""The device actors of a run: a placement group with one bundle per device (and per warm standby), one
DeviceActor per rank, the process group over them, and replacing some of them while the others live on.

Ranks are fixed (rank r holds experts [r*El, (r+1)*El)); bundles are not: a standby that takes over
rank r brings its own bundle, and the bundle r had is handed to a new standby. Ray moves the bundles
of a node that died to a live node, so replacements for a lost node start wherever it put them.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.config import Config, mesh_shape
from orchestrator.device.actor import DeviceActor, autocast_dtype
from orchestrator.config import FaultKind
from orchestrator.device.faults import injection
from orchestrator.errors import CheckpointError, RunError, StateMismatch, last_line
from orchestrator.parallel.groups import choose_backend

log = logging.getLogger(__name__)
# A thread of its own for progress(), so that it answers while a step is stuck; one for checkpoint writes
# (write_shard), so that they run while training goes on; everything else runs in order.
RemoteDevice = ray.remote(concurrency_groups={"watch": 1, "io": 1, "snapshot": 1})(DeviceActor)


def get(refs: list[Any], timeout_s: float, what: str) -> list[Any]:
    """ray.get with a deadline; a timeout or a dead actor becomes a RunError saying what was awaited."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        raise RunError(f"timed out after {timeout_s:.0f}s waiting for the devices to {what}") from None
    except RayActorError as e:
        raise RunError(f"a device actor died while trying to {what}: {e}") from e
    except RayTaskError as e:  # an error inside a device (a rendezvous timeout, ...): the recovery may retry it
        if isinstance(e, CheckpointError):  # a state that cannot be restored: its own type, in one line
            raise (StateMismatch if isinstance(e, StateMismatch) else CheckpointError)(
                f"a device could not {what}: {last_line(e)}") from e
        if isinstance(e, RunError):  # ours already: it says what is wrong
            raise
        raise RunError(f"a device failed to {what}: {last_line(e)}") from e


class DeviceGroup:
    def __init__(self, cfg: Config):
        self.cfg, self.world = cfg, cfg.cluster.num_devices
        self.actors: list[Any] = []
        self.info: list[dict[str, Any]] = []                 # pid, node_id, ip, gpu_ids of each rank's actor
        self.restarts: list[int] = [0] * self.world          # replacements of each rank's actor so far
        self.bundle_of: list[int] = list(range(self.world))  # placement-group bundle of each rank
        self.standby: list[tuple[Any, int, Any]] = []        # (actor, bundle, info ref) of warm spares
        self.pg = None
        self.shard_inputs: tuple[dict[str, Any], Any, Any] | None = None   # (config, train, val): build()
        self.backend = "gloo"                                # chosen in start() from where the devices landed

    def settle_backend(self) -> None:
        """nccl when every device has a GPU of its own, else gloo (with a warning); a GPU run whose torch sees no
        GPU is an error, not a silent CPU run."""
        c = self.cfg.cluster
        if c.use_gpu:
            blind = [(rank, i) for rank, i in enumerate(self.info) if not i.get("cuda")]
            if blind:
                rank, i = blind[0]
                build = (f"built for CUDA {i['torch_cuda']}: is the NVIDIA driver there?" if i.get("torch_cuda")
                         else "a CPU-only build: install a CUDA build of torch on the GPU nodes, PyPI's Linux wheel is one")
                raise RunError(f"cluster.use_gpu=true, but torch {i.get('torch')} in device {rank}'s process on "
                               f"{i.get('ip')} sees no CUDA GPU ({build}); or set cluster.use_gpu=false")
        self.backend, warning = choose_backend(c.backend, c.use_gpu, self.info)
        if warning:
            log.warning("%s", warning)

    def settle_mixed_precision(self) -> str:
        """train.mixed_precision as every device will run it ('bf16' or 'none'): the same on all devices (the
        combine all_to_all carries the autocast dtype), bf16 only where every device has it in hardware."""
        cfg = self.cfg
        kind = "cuda" if cfg.cluster.use_gpu else "cpu"
        casts = {autocast_dtype(cfg.train.mixed_precision, cfg.train.dtype, kind, bool(i.get("bf16")))
                 for i in self.info}
        if len(casts) > 1:
            log.warning("train.mixed_precision=%s: some devices have bf16 in hardware and some not; all run "
                        "without autocast", cfg.train.mixed_precision)
        settled = "none" if None in casts else "bf16"   # each device's cast is bf16 or None
        if cfg.train.mixed_precision == "bf16" and settled == "none":
            log.warning("train.mixed_precision=bf16, but a device's GPU has no bf16 in hardware: running float32")
        return settled

    def inject(self, fault: Any) -> None:
        """Make a planned fault (FaultSpec) happen on its device, as its kind's injection says (device/faults.py INJECTIONS)."""
        actor, rule = self.actors[fault.rank], injection(fault.kind)
        if rule.fails_save:  # the next shard this device writes fails midway
            actor.fail_next_save.remote("fail")
        elif rule.on_node:
            node = self.node_of(fault.rank)
            if node == ray.get_runtime_context().get_node_id():
                # Killing the raylet of the driver's own node ends the run; kill every device actor there instead.
                log.warning("node fault on device %d: its node runs the driver too; killing every device actor "
                            "on it instead of the node", fault.rank)
                for rank in range(self.world):
                    if self.node_of(rank) == node:
                        self.actors[rank].inject.remote(FaultKind.KILL)
            else:
                actor.inject.remote(fault.kind)
        else:
            actor.inject.remote(fault.kind, fault.steps, fault.delay_s, fault.in_collective)

    def node_of(self, rank: int) -> str | None:
        return self.info[rank].get("node_id") if 0 <= rank < len(self.info) else None

    def start(self) -> None:
        """Placement group, one actor per rank (and the standbys), the process group."""
        c, spares = self.cfg.cluster, self.cfg.faults.standby
        bundle = {"CPU": c.cpus_per_device, **({"GPU": c.gpus_per_device} if c.use_gpu else {})}
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
        self.settle_backend()
        self.form_group()

    def check_storage_reach(self, storage: Any) -> None:
        """Devices write their checkpoint shards themselves, so each must be able to write where the driver
        commits: every device on another node writes a marker that the driver must then see (a local path on
        several nodes must be one shared filesystem), and on object storage every device does (its node needs
        credentials for the bucket, not only the driver's)."""
        here = ray.get_runtime_context().get_node_id()
        ranks = [rank for rank, i in enumerate(self.info) if not storage.local or i["node_id"] != here]
        if not ranks:
            return
        tag = uuid.uuid4().hex[:8]
        names = {r: f".reach-{tag}-device{r}" for r in ranks}
        try:
            errors = get([self.actors[r].touch.remote(storage.uri, names[r]) for r in ranks],
                         self.cfg.cluster.start_timeout_s, "write a marker into the checkpoint directory")
            unseen = [r for r, e in zip(ranks, errors) if e is None and not storage.exists(names[r])]
        finally:
            for name in names.values():
                try:
                    storage.delete(name)
                except Exception as e:  # a leftover marker is harmless; the reason we are here is not hidden
                    log.warning("could not delete %s under %s: %s", name, storage.shown, e)
        failed = [(r, e) for r, e in zip(ranks, errors) if e is not None]
        if failed:
            r, e = failed[0]
            raise RunError(f"device {r} on node {self.info[r]['ip']} cannot write to checkpoint.dir {storage.shown!r}: "
                           f"{e}. Devices write their own checkpoint shards: give every node access (on clouds, the "
                           f"worker nodes' instance role or service account, not only the head's)")
        if unseen:
            r = unseen[0]
            raise RunError(f"checkpoint.dir {storage.shown!r} is a local path, and what device {r} on node "
                           f"{self.info[r]['ip']} writes there does not appear on the driver's node: devices write "
                           f"their own checkpoint shards, so on several nodes it must be shared storage mounted at "
                           f"the same path everywhere (NFS, EFS, Filestore) or object storage (checkpoint.dir="
                           f"s3://bucket/prefix, gs://...)")
        log.info("checkpoint dir %s: written to from %d device(s)%s", storage.shown, len(ranks),
                 " on other nodes" if storage.local else "")

    def new_actor(self, bundle: int) -> Any:
        c = self.cfg.cluster
        threads = c.torch_threads or max(1, int(c.cpus_per_device))
        return RemoteDevice.options(
            num_cpus=c.cpus_per_device, num_gpus=c.gpus_per_device if c.use_gpu else 0, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle)
        ).remote(threads)

    def spawn_standby(self, bundle: int) -> None:
        actor = self.new_actor(bundle)
        self.standby.append((actor, bundle, actor.info.remote()))

    def form_group(self) -> None:
        """(Re)form the process group over the current actors (after a replacement too: rank 0 may be a new
        actor); rank 0 binds the rendezvous port on its node's address and keeps it until its store serves it."""
        if self.world == 1:
            return
        c = self.cfg.cluster
        addr = self.info[0]["ip"]
        port = get([self.actors[0].open_rendezvous.remote(addr)], c.start_timeout_s, "open the rendezvous")[0]
        ep = mesh_shape(self.cfg)[0]
        get([a.join_group.remote(self.backend, addr, port, rank, self.world, c.collective_timeout_s, ep)
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

    def spares_elsewhere(self, ranks: list[int]) -> set[int]:
        """The ranks among `ranks` for which a warm standby waits on another node than the rank's own."""
        nodes = set()
        for _, _, info_ref in self.standby:
            try:
                nodes.add(ray.get(info_ref, timeout=5.0)["node_id"])
            except Exception:  # a standby that does not answer is no spare
                continue
        return {r for r in ranks if nodes - {self.node_of(r)}}

    def _replacement(self, rank: int, timeout_s: float) -> tuple[Any, dict[str, Any] | None]:
        """A warm standby that answers, one on another node first (its bundle becomes the rank's, a new standby
        takes the old one), else a new actor in the rank's bundle."""
        here = self.node_of(rank)
        known = {}
        for actor, bundle, info_ref in self.standby:
            ready, _ = ray.wait([info_ref], timeout=0)
            if ready:
                try:
                    known[bundle] = ray.get(info_ref)["node_id"]
                except Exception:
                    pass
        self.standby.sort(key=lambda s: known.get(s[1]) == here)  # standbys on other nodes first (stable)
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
            log.info("device %d: warm standby pid %d takes over (bundle %d); a new standby starts in bundle %d",
                     rank, info["pid"], bundle, old)
            return actor, info
        log.info("device %d: no warm standby; a new actor starts in bundle %d", rank, self.bundle_of[rank])
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

    def build(self, ranks: Any, timeout_s: float, what: str) -> None:
        """The devices of `ranks` build their shards (initial state: init keyed by seed, rank and expert id) from
        `shard_inputs`: the run's config as a dict and its data in the object store (set once at the start)."""
        assert self.shard_inputs is not None
        cfg, train, val = self.shard_inputs
        self.bind_cores(timeout_s)   # before the build: its memory is first touched on the device's own cores
        get([self.actors[r].build.remote(cfg, r, self.world, train, val) for r in ranks], timeout_s, what)

    def bind_cores(self, timeout_s: float) -> None:
        """cluster.bind_cores: every device bound to cores of its own among the devices on its host (the same IP and
        the same usable CPUs: nodes of one machine share its cores, containers with cpusets of their own do not),
        all of them again after a replacement moved devices between hosts; the CPUs land in `info[rank]["cores"]`
        (None: unbound)."""
        c = self.cfg.cluster
        hosts = [(i.get("ip"), tuple(i.get("usable_cpus") or ())) for i in self.info]
        refs = []
        for r in range(self.world):
            same = [q for q in range(self.world) if hosts[q] == hosts[r]]
            refs.append(self.actors[r].bind_cores.remote(same.index(r), len(same), c.bind_cores, c.use_gpu))
        for r, cores in enumerate(get(refs, timeout_s, "bind cores")):
            self.info[r]["cores"] = cores

    def evaluate(self, batches: int, timeout_s: float) -> float:
        """The validation loss over `batches` held-out batches (every device takes part; all report the same)."""
        return get([a.evaluate.remote(batches) for a in self.actors], timeout_s, "evaluate")[0]

    def global_parameters(self, timeout_s: float) -> dict[str, Any]:
        """Every parameter of the model, gathered from the devices (experts by global id)."""
        merged: dict[str, Any] = {}
        for part in get([a.global_parameters.remote() for a in self.actors], timeout_s, "report their parameters"):
            merged.update(part)
        return merged

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
