"""The default process group of one device: formed, torn down and formed again in the same process.

Recovery replaces failed devices while survivors keep running, so a group is never assumed to live
as long as the process: `join` destroys any previous group first, and every collective in this
package uses the default group, so code holding no reference picks up the new one.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import torch.distributed as dist


def choose_backend(requested: str, use_gpu: bool, devices: list[dict]) -> tuple[str, str | None]:
    """The process-group backend for the devices described by `devices` (each rank's actor: `node_id`,
    `gpu_ids`), and a warning to show (None if there is nothing to say). nccl needs a GPU of its own per
    device: devices sharing one fall back to gloo, or fail with `requested='nccl'`."""
    if not use_gpu:
        return "gloo", None
    holders: dict[tuple[str, str], list[int]] = {}
    for rank, d in enumerate(devices):
        for gpu in d.get("gpu_ids") or []:
            holders.setdefault((str(d.get("node_id")), str(gpu)), []).append(rank)
    shared = next(((key, ranks) for key, ranks in holders.items() if len(ranks) > 1), None)
    if shared is None:
        return ("nccl" if requested == "auto" else requested), None
    (node, gpu), ranks = shared
    why = f"devices {', '.join(map(str, ranks))} share GPU {gpu} on node {node[:12]}"
    if requested == "nccl":
        from orchestrator.errors import RunError

        raise RunError(f"cluster.backend=nccl, but {why}: nccl needs a GPU of its own per device; set "
                       f"cluster.gpus_per_device=1 on a cluster with a GPU per device, or cluster.backend=gloo")
    return "gloo", (f"{why}: nccl needs a GPU of its own per device, so the devices talk over gloo instead "
                    f"(slower); for nccl give every device its own GPU (cluster.gpus_per_device=1)")


def free_port(host: str = "") -> int:
    """A port that was free a moment ago (bound, then closed): for tests and tools starting servers of their own.
    Another process may take it before it is used; the rendezvous never relies on it (see open_rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Rank 0's rendezvous socket: bound and listening from open_rendezvous until join hands it to the TCPStore.
_rendezvous: socket.socket | None = None


def open_rendezvous(host: str) -> int:
    """Bind and listen on host:<a port the OS picks> now, keep the socket, and return the port (for the other
    ranks). `join` on rank 0 hands this very socket to its TCPStore: the port is held from the moment it is
    chosen until the store serves it, where a probed port (bound, closed, bound again later) could be taken by
    another process in between. A second call closes the socket of the first (a group formed again)."""
    global _rendezvous
    close_rendezvous()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    _rendezvous = socket.create_server((host, 0), family=family, backlog=socket.SOMAXCONN)
    return _rendezvous.getsockname()[1]


def close_rendezvous() -> None:
    global _rendezvous
    if _rendezvous is not None:
        _rendezvous.close()
        _rendezvous = None


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:  # a host name: compared as given
        return a == b


def _listening_socket(addr: str, port: int, world: int) -> socket.socket:
    """The socket rank 0's store serves on: the one open_rendezvous holds for addr:port, else one bound now
    (for callers that chose the port themselves, such as tests spawning processes)."""
    global _rendezvous
    held, _rendezvous = _rendezvous, None
    if held is not None:
        host, held_port = held.getsockname()[:2]
        if held_port == port and _same_address(host, addr):
            return held
        held.close()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return socket.create_server((addr, port), family=family, backlog=world)


def interface_of(ip: str) -> str | None:
    """The name of this machine's network interface that holds IPv4 address `ip` (Linux), else None."""
    try:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _, name in socket.if_nameindex():
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue  # no IPv4 address on it
                if socket.inet_ntoa(packed[20:24]) == ip:
                    return name
    except (ImportError, OSError):
        pass
    return None


def join(backend: str, master_addr: str, master_port: int, rank: int, world: int, timeout_s: float,
         own_ip: str | None = None) -> None:
    """Form (or re-form) the default group. Rendezvous through a TCP store that rank 0 serves on
    master_addr:master_port, listening on that address only (torch's own tcp:// store listens on every
    interface: on a laptop that would open a port to the network). Rank 0 serves on the socket that
    open_rendezvous holds for that address and port, if any: the port was never free since it was chosen."""
    leave()
    if master_addr.startswith("127."):
        # A loopback cluster keeps the backends' own sockets on loopback too (nccl's bootstrap would listen on
        # the first network interface).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    elif own_ip and "GLOO_SOCKET_IFNAME" not in os.environ:
        # On several nodes gloo would take the address the hostname resolves to, 127.0.1.1 on many Debian and
        # Ubuntu hosts, which peers cannot reach: use the interface of the address Ray knows this node by.
        name = interface_of(own_ip)
        if name:
            os.environ["GLOO_SOCKET_IFNAME"] = name
    timeout = timedelta(seconds=timeout_s)
    listen_fd = None
    if rank == 0:
        listen_fd = _listening_socket(master_addr, master_port, world).detach()   # the store owns it from here
    store = dist.TCPStore(master_addr, master_port, world, rank == 0, timeout, master_listen_fd=listen_fd)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class StepClock:
    """Where this device is in its step, readable from another thread while the step runs.

    Every collective of this package runs inside `collective(name)`, so the watch can tell a device
    that stopped on its own (not inside a collective) from peers waiting for it inside one, and the
    step's own work from time spent waiting in collectives (straggler detection).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.step, self.phase, self.collectives, self.collective_s = 0, "idle", 0, 0.0
        self.since = time.monotonic()

    def start(self, step: int) -> None:
        with self._lock:
            self.step, self.phase, self.collectives, self.collective_s = step, "compute", 0, 0.0
            self.since = time.monotonic()

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase, self.since = phase, time.monotonic()

    @contextmanager
    def collective(self, name: str) -> Iterator[None]:
        with self._lock:
            previous, self.phase, self.collectives = self.phase, f"collective:{name}", self.collectives + 1
            t0 = self.since = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self.collective_s += time.monotonic() - t0
                self.phase, self.since = previous, time.monotonic()

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"step": self.step, "phase": self.phase, "collectives": self.collectives,
                    "in_collective": self.phase.startswith("collective:"), "for_s": time.monotonic() - self.since,
                    "pid": os.getpid()}


CLOCK = StepClock()
