"""The GPU path's decisions, checked on CPU: which process-group backend devices get (nccl only with a GPU of their
own per device; gloo with a warning when they share one), when the forward autocasts to bf16, the config's checks,
and a bf16-autocast run on two CPU devices against the float32 run (the autocast path itself is the same code on a
GPU). The CUDA-only parts (pinned snapshot buffers, GPU memory in status.json, nccl) need a GPU: not in this suite."""
from __future__ import annotations


import pytest
import torch

from orchestrator.config import ConfigError
from orchestrator.device.actor import autocast_dtype
from orchestrator.driver import Driver
from orchestrator.errors import RunError
from orchestrator.parallel.groups import choose_backend
from tests.conftest import step_records, tiny_config


def gpus(*placed: tuple[str, str]) -> list[dict]:
    return [{"node_id": node, "gpu_ids": [gpu]} for node, gpu in placed]


def test_nccl_when_every_device_has_its_own_gpu():
    assert choose_backend("auto", True, gpus(("a", "0"), ("a", "1"), ("b", "0"))) == ("nccl", None)
    assert choose_backend("gloo", True, gpus(("a", "0"), ("a", "1"))) == ("gloo", None)
    assert choose_backend("auto", False, [{"node_id": "a", "gpu_ids": []}] * 2) == ("gloo", None)


def test_devices_sharing_a_gpu_fall_back_to_gloo_with_a_message():
    backend, warning = choose_backend("auto", True, gpus(("a", "0"), ("b", "0"), ("b", "0")))
    assert backend == "gloo"
    assert warning.startswith("devices 1, 2 share GPU 0 on node b: nccl needs a GPU of its own per device")
    assert "cluster.gpus_per_device=1" in warning
    with pytest.raises(RunError, match=r"cluster.backend=nccl, but devices 0, 1 share GPU 3 on node a.*"
                                       r"cluster.backend=gloo"):
        choose_backend("nccl", True, gpus(("a", "3"), ("a", "3")))


def test_when_the_forward_autocasts_to_bf16():
    bf16 = torch.bfloat16
    assert autocast_dtype("auto", "float32", "cuda", bf16_supported=True) == bf16
    assert autocast_dtype("auto", "float32", "cuda", bf16_supported=False) is None   # V100, T4: float32
    assert autocast_dtype("auto", "float32", "cpu", bf16_supported=False) is None
    assert autocast_dtype("bf16", "float32", "cpu", bf16_supported=False) == bf16
    assert autocast_dtype("none", "float32", "cuda", bf16_supported=True) is None
    assert autocast_dtype("auto", "float64", "cuda", bf16_supported=True) is None    # the exact reference stays exact


def test_gpu_config_errors():
    with pytest.raises(ConfigError, match="train.mixed_precision='bf16' with train.dtype='float64'"):
        tiny_config(None, "train.mixed_precision=bf16", "train.dtype=float64")
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        tiny_config(None, "train.mixed_precision=fp8")
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match=rf"cluster.gpus_per_device={bad}"):
            tiny_config(None, f"cluster.gpus_per_device={bad}")


def test_bf16_autocast_trains_close_to_float32(ray_session, tmp_path):
    def run(name: str, *overrides: str) -> list[float]:
        Driver(tiny_config(tmp_path / name, "cluster.num_devices=2", "train.steps=6", *overrides),
               tmp_path / name).run()
        return [r["loss"] for r in step_records(tmp_path / name)]

    f32, bf16 = run("f32"), run("bf16", "train.mixed_precision=bf16")
    assert len(bf16) == 6 and bf16 != f32                       # the forward really ran in bf16 ...
    assert bf16 == pytest.approx(f32, rel=2e-2)                 # ... and learns as float32 does
    assert bf16[-1] < bf16[0]


def test_the_interface_gloo_is_given_holds_the_nodes_address():
    """On several nodes gloo is pointed at the interface of the address Ray knows the node by (not whatever the
    hostname resolves to, 127.0.1.1 on many hosts)."""
    import socket

    from orchestrator.parallel.groups import interface_of

    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.250") is None          # TEST-NET-3: no interface here has it
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))                 # no packet is sent: this only picks the outgoing address
        except OSError:
            pytest.skip("this machine has no route off loopback")
        ip = s.getsockname()[0]
    name = interface_of(ip)
    assert name is not None and name != "lo" and name in {n for _, n in socket.if_nameindex()}


def test_gpu_peaks_match_the_most_specific_name():
    from orchestrator.monitoring.metrics import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "float32") == 67e12
    assert gpu_peak_flops("NVIDIA L40S", "bfloat16") == 362e12 and gpu_peak_flops("NVIDIA L4", "bfloat16") == 121e12
    assert gpu_peak_flops("NVIDIA A10G", "bfloat16") == 70e12 and gpu_peak_flops("NVIDIA A10", "bfloat16") == 125e12
    assert gpu_peak_flops("Some Future GPU", "bfloat16") is None
