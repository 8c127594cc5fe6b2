"""Binding a device's process to cores of its own (cluster.bind_cores), as DeepSpeed's `--bind_cores_to_rank` and
Intel's `ipex.cpu.launch` do for CPU training (they also split by NUMA node; here a block of whole physical cores,
taken in socket order, keeps a device on one socket where it fits).

Unbound, the OS moves a device's compute thread between the host's cores whenever another process wakes up (the
driver, Ray's raylet, GCS and agents, a peer's gloo threads). Each move costs the thread its warm caches, and in
lock-step collectives one slowed device stalls every peer. On the 2-core VM, two devices bound one core each ran the
default job's step about 8% faster, in the Ray job and in the plain torch.distributed job alike (bench/README.md,
"Devices bound to cores").

Linux only (`os.sched_setaffinity`); elsewhere nothing is bound.
"""
from __future__ import annotations

import os
from pathlib import Path

SYS_CPU = Path("/sys/devices/system/cpu")


def physical_cores(cpus: list[int], sys_cpu: Path = SYS_CPU) -> list[list[int]]:
    """`cpus` (logical CPU ids) grouped by physical core, hyperthread siblings together, in (socket, core) order;
    a CPU whose topology sysfs does not give is a core of its own."""
    def key(cpu: int) -> tuple[int, int, int]:
        try:
            topo = sys_cpu / f"cpu{cpu}" / "topology"
            return int((topo / "physical_package_id").read_text()), int((topo / "core_id").read_text()), -1
        except (OSError, ValueError):
            return -1, -1, cpu
    groups: dict[tuple[int, int, int], list[int]] = {}
    for cpu in sorted(cpus):
        groups.setdefault(key(cpu), []).append(cpu)
    return [groups[k] for k in sorted(groups)]


def cores_of(index: int, count: int, cores: list[list[int]]) -> list[int]:
    """The logical CPUs of the `index`-th of `count` devices on a host whose usable physical cores are `cores`
    (physical_cores): an equal contiguous block of whole physical cores each (the remainder unused) while there are at
    least as many physical cores as devices, else one logical CPU each, round-robin. ValueError on an index outside
    0..count-1 or no cores."""
    if not 0 <= index < count or not cores:
        raise ValueError(f"device {index} of {count} on cores {cores}")
    if count > len(cores):
        cpus = sorted(c for core in cores for c in core)
        return [cpus[index % len(cpus)]]
    per = len(cores) // count
    return sorted(c for core in cores[index * per:(index + 1) * per] for c in core)


def should_bind(mode: str, count: int, usable_count: int, gpu: bool) -> bool:
    """cluster.bind_cores: `rank` always; `none` never; `auto` for CPU devices while the host's devices are no more
    than its usable physical cores (`usable_count`; more devices than cores share cores, and binding them would
    forbid the OS to balance them)."""
    if mode == "rank":
        return True
    return mode == "auto" and not gpu and count <= usable_count


def bind_process(cpus: list[int]) -> list[int] | None:
    """Bind every thread of this process to the logical CPUs `cpus` (threads started later inherit their creator's);
    the CPUs the OS reports for this thread afterwards, or None where the platform cannot bind. OSError when the OS
    refuses (a CPU outside the process's cpuset)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    done: set[str] = set()
    while True:   # again until no thread is new: one started meanwhile by a thread not yet bound is bound too
        tids = set(os.listdir("/proc/self/task")) - done
        if not tids:
            break
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:   # a thread that ended meanwhile
                pass
        done |= tids
    return sorted(os.sched_getaffinity(0))


def bind_device(index: int, count: int, mode: str, gpu: bool, usable: list[int]) -> list[int] | None:
    """cluster.bind_cores for the `index`-th of the `count` devices on a host, in the device's process: bound to its
    block of the physical cores in `usable` (the CPUs the process could use before any binding), and the CPUs the
    OS reports then; None when unbound (the mode says so, the block is all of `usable`, or the platform cannot
    bind), an earlier binding undone. OSError when the OS refuses."""
    cores = physical_cores(usable)
    if should_bind(mode, count, len(cores), gpu):
        cpus = cores_of(index, count, cores)
        if cpus != usable:
            return bind_process(cpus)
    if usable_cpus() != usable:   # bound before, in another layout: unbound again
        bind_process(usable)
    return None


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity: a container's cpuset, taskset), else all."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


__all__ = ["physical_cores", "cores_of", "should_bind", "bind_process", "bind_device", "usable_cpus"]
