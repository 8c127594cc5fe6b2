"""The default process group of one device: formed, torn down and formed again in the same process.

Recovery replaces failed devices while survivors keep running, so a group is never assumed to live
as long as the process: `join` destroys any previous group first, and every collective in this
package uses the default group, so code holding no reference picks up the new one.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist


def pick_backend(requested: str, use_gpu: bool) -> str:
    if requested != "auto":
        return requested
    return "nccl" if use_gpu and torch.cuda.is_available() else "gloo"


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def join(backend: str, master_addr: str, master_port: int, rank: int, world: int, timeout_s: float) -> None:
    """Form (or re-form) the default group. Rendezvous over TCP at master_addr:master_port."""
    leave()
    if master_addr.startswith("127.") and backend == "gloo":
        # A loopback cluster keeps gloo's own sockets on loopback too.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))


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
