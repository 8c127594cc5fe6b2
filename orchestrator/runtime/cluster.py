"""Join a Ray cluster that answers, else start a local one; always leave things as they were found.

Order: an address in the config or in RAY_ADDRESS (what `ray job submit` sets) is joined and must
answer; otherwise a local head recorded in /tmp/ray/ray_current_cluster is joined if its GCS port
answers (a stopped `ray start` leaves that file behind, and a plain `ray.init()` would hang on it);
otherwise a private local instance is started on loopback and shut down at the end. A watchdog process
(runtime/watchdog.py) takes that private instance down should this process die without shutting it down
(kill -9): Ray's own fate sharing leaves its dashboard and runtime-env agents running.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from orchestrator.runtime import signals
from orchestrator.config import ClusterConfig
from orchestrator.errors import RunError

CURRENT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")
# Ray reads this when it is imported: Linux then advertises 127.0.0.1 instead of the network address.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rpartition(":")[0] or address
    return host.startswith("127.") or host in ("localhost", "[::1]")


def _use_loopback(log: logging.Logger) -> None:
    """Make Ray use 127.0.0.1 for this process; must happen before `import ray`."""
    if LOOPBACK_ENV in os.environ:
        return
    os.environ[LOOPBACK_ENV] = "0"
    if "ray" in sys.modules:
        log.warning("ray was imported before the cluster was chosen; set %s=0 before importing ray so that a "
                    "loopback cluster is reached on 127.0.0.1", LOOPBACK_ENV)


def _join(address: str, source: str) -> None:
    import ray

    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except Exception as e:
        hint = ("; if the cluster uses token authentication (the default of `ray start` in Ray 2.60), set "
                "RAY_AUTH_MODE=token (the token is read from ~/.ray/auth_token or RAY_AUTH_TOKEN)"
                if not os.environ.get("RAY_AUTH_MODE") else "")
        raise RunError(f"could not join the Ray cluster at {address!r} (from {source}): {e}{hint}") from e


@contextmanager
def ray_cluster(cfg: ClusterConfig, log: logging.Logger | None = None, spare_devices: int = 0) -> Iterator[str]:
    """Context in which Ray is initialised; yields how ('joined ADDRESS', 'started ...', 'already ...').

    A local instance it starts declares CPUs for every device and `spare_devices` warm standbys (Ray's
    CPUs are logical: fewer cores only share them)."""
    log = log or logging.getLogger(__name__)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        yield "already initialised"
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    local = None if address else live_local_cluster()
    if (address and _is_loopback(address)) or not address:
        _use_loopback(log)  # a local head, or a private instance: stay on 127.0.0.1
    import ray

    watchdog = None
    try:
        if address:
            how = f"joined {address}"
            _join(address, "cluster.address" if cfg.address else "RAY_ADDRESS")
        elif local is not None:
            how = f"joined the local cluster at {local}"
            _join(local, str(CURRENT_CLUSTER_FILE))
        else:
            need = math.ceil((cfg.num_devices + spare_devices) * cfg.cpus_per_device)
            how = "started a local Ray instance"
            context = ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
                               logging_level=logging.WARNING)
            watchdog = _watch(context.address_info["session_dir"], log)
        signals.reinstall()  # ray.init set its own SIGTERM handler (sys.exit(15)) over the job's
        log.info("ray: %s", how)
        yield how
    finally:  # also when ray.init itself is interrupted: what it started so far goes
        ray.shutdown()
        if watchdog is not None:
            watchdog.release()


def _watch(session_dir: str, log: logging.Logger):
    """The watchdog of the private instance just started (None, with a warning, if it cannot be started)."""
    import ray

    from orchestrator.runtime.watchdog import watch

    try:
        watchdog = watch(session_dir, os.path.dirname(ray.__file__))
    except OSError as e:
        log.warning("ray: could not start the watchdog of session %s (%s): should this process be killed, "
                    "stop what is left of it with `ray stop`", session_dir, e)
        return None
    log.info("ray: session %s; watchdog pid %d takes it down should this process die without doing so",
             session_dir, watchdog.pid)
    return watchdog
