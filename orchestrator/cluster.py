"""Join a Ray cluster that answers, else start a local one; always leave things as they were found.

Order: an address in the config or in RAY_ADDRESS (what `ray job submit` sets) is joined and must
answer; otherwise a local head recorded in /tmp/ray/ray_current_cluster is joined if its GCS port
answers (a stopped `ray start` leaves that file behind, and a plain `ray.init()` would hang on it);
otherwise a private local instance is started on loopback and shut down at the end.
"""
from __future__ import annotations

import logging
import math
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from orchestrator.config import ClusterConfig

CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")


class ClusterError(RuntimeError):
    pass


def answers(address: str, timeout_s: float = 2.0) -> bool:
    """True if something accepts TCP connections at host:port."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def live_local_cluster() -> str | None:
    try:
        address = CURRENT_CLUSTER_FILE.read_text().strip()
    except OSError:
        return None
    return address if address and answers(address) else None


@contextmanager
def ray_cluster(cfg: ClusterConfig, log: logging.Logger | None = None) -> Iterator[str]:
    """Context in which Ray is initialised; yields how ('joined ADDRESS', 'started local', 'already')."""
    import ray

    log = log or logging.getLogger(__name__)
    if ray.is_initialized():
        yield "already initialised"
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        how = f"joined {address}"
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except Exception as e:
            raise ClusterError(f"could not join the Ray cluster at {address!r} (from "
                               f"{'cluster.address' if cfg.address else 'RAY_ADDRESS'}): {e}") from e
    elif (local := live_local_cluster()) is not None:
        how = f"joined local cluster {local}"
        ray.init(address=local, logging_level=logging.WARNING)
    else:
        # Ray on Linux advertises the machine's network address unless told this is a one-machine cluster.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        need = math.ceil(cfg.num_devices * cfg.cpus_per_device)
        how = "started a local Ray instance"
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
                 logging_level=logging.WARNING)
    log.info("ray: %s", how)
    try:
        yield how
    finally:
        ray.shutdown()
