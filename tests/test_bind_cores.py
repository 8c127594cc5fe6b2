"""cluster.bind_cores (device/cores.py): which cores each device of a host gets, and when it is bound. The bound run
itself is checked in tests/test_monitoring.py (status.json's `cores`, read back from the OS in each actor)."""
import os

import pytest

from orchestrator.config import ConfigError
from orchestrator.device.cores import bind_device, bind_process, cores_of, physical_cores, should_bind, usable_cpus
from tests.conftest import tiny_config


def test_each_device_gets_an_equal_block_of_physical_cores_or_one_cpu_round_robin():
    one_each = [[0], [1]]
    assert [cores_of(i, 2, one_each) for i in range(2)] == [[0], [1]]
    # hyperthread siblings stay together: 4 physical cores of 2 CPUs each (Linux numbers siblings apart)
    smt = [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [cores_of(i, 2, smt) for i in range(2)] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [cores_of(i, 3, smt) for i in range(3)] == [[0, 4], [1, 5], [2, 6]]      # the remainder unused
    assert [cores_of(i, 3, one_each) for i in range(3)] == [[0], [1], [0]]          # more devices than cores
    with pytest.raises(ValueError):
        cores_of(2, 2, one_each)


def test_cpus_are_grouped_by_socket_and_core_from_sysfs(tmp_path):
    # two sockets of two cores, each with a sibling; cpu 9 has no topology
    for cpu, (socket, core) in {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1), 4: (0, 0), 5: (1, 0), 6: (0, 1),
                                7: (1, 1)}.items():
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{socket}\n")
        (topo / "core_id").write_text(f"{core}\n")
    assert physical_cores([0, 1, 2, 3, 4, 5, 6, 7, 9], tmp_path) == [[9], [0, 4], [2, 6], [1, 5], [3, 7]]
    assert physical_cores([1, 5, 3], tmp_path) == [[1, 5], [3]]


def test_auto_binds_cpu_devices_while_each_has_a_core():
    assert should_bind("auto", 2, 2, gpu=False) and not should_bind("auto", 4, 2, gpu=False)
    assert not should_bind("auto", 1, 16, gpu=True)
    assert should_bind("rank", 4, 2, gpu=True) and not should_bind("none", 1, 16, gpu=False)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="binding is Linux-only")
def test_binding_a_process_binds_its_threads_and_can_be_undone():
    import threading

    usable = usable_cpus()
    seen = []
    try:
        assert bind_process(usable[:1]) == usable[:1]
        t = threading.Thread(target=lambda: seen.append(sorted(os.sched_getaffinity(0))))   # started after: inherits
        t.start()
        t.join()
        assert seen == [usable[:1]]
    finally:
        assert bind_process(usable) == usable


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="binding is Linux-only; needs two CPUs")
def test_a_device_is_bound_to_its_block_and_unbound_again_when_the_mode_says_none():
    usable = usable_cpus()
    try:
        assert bind_device(0, 1, "rank", False, usable) is None   # one device: its block is every CPU, none bound
        got = bind_device(1, 2, "rank", False, usable)
        assert got and set(got) < set(usable) and sorted(os.sched_getaffinity(0)) == got
        assert bind_device(1, 2, "none", False, usable) is None
        assert sorted(os.sched_getaffinity(0)) == usable
    finally:
        bind_process(usable)


def test_a_bad_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cluster.bind_cores='all' is not one of auto, rank, none"):
        tiny_config(tmp_path, "cluster.bind_cores=all")
