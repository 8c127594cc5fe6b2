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


# bench/gpu.py, the prepared command for a lent GPU: its logic on CPU (the GPU numbers need the GPU)
from bench import gpu as gpu_bench   # noqa: E402


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_gpu_bench_budget_gives_each_part_its_share_and_unspent_time_to_the_next():
    clock = FakeClock()
    budget = gpu_bench.Budget(100.0, (("a", 0.2), ("b", 0.3), ("c", 0.5)), clock=clock)
    a = budget.part("a")
    assert a.left() == pytest.approx(20.0)
    clock.t += 5.0                                     # a ends early: b gets its 30 s and a's unspent 15 s
    assert budget.part("b").left() == pytest.approx(45.0)
    clock.t += 60.0                                    # b overran to 65 s: c still gets its own share ...
    c = budget.part("c")
    assert c.left() == pytest.approx(35.0)             # ... but never past the end (100 s)
    clock.t += 35.0
    assert c.expired() and c.left() == 0.0
    half = gpu_bench.Deadline(clock.t + 30.0, clock).share(3)   # the next of 3 equal pieces of what is left
    assert half.left() == pytest.approx(10.0)
    with pytest.raises(ValueError, match="add up to 1"):
        gpu_bench.Budget(10.0, (("a", 0.5), ("b", 0.6)))
    with pytest.raises(ValueError, match="> 0"):
        gpu_bench.Budget(0.0)


def test_gpu_bench_arguments():
    args = gpu_bench.parse_args([])
    assert args.budget_s == 540.0 and args.parts == ["env", "smoke", "throughput", "sweep"]
    assert args.jobs == ["default", "gpu", "sft_dsv4"] and args.runner == "shard"
    args = gpu_bench.parse_args(["--cpu-dry-run", "--only", "sweep,smoke", "--jobs", "gpu"])
    assert args.budget_s == 150.0 and args.parts == ["env", "smoke", "sweep"] and args.jobs == ["gpu"]
    assert gpu_bench.parse_args(["--runner", "job", "train.steps=5"]).jobs == ["default", "gpu"]
    for bad in (["--only", "warp"], ["--budget-s", "0"], ["--jobs", "nope"], ["train.steps=5"],
                ["--runner", "job", "--jobs", "sft_dsv4"]):
        with pytest.raises(SystemExit):
            gpu_bench.parse_args(bad)


def test_gpu_bench_throughput_figures():
    """Step times after the warm-up; tokens/s = positions per step / step time; MFU against the given peak."""
    walls = [5.0, 2.0, 1.5] + [0.5] * 4
    s = gpu_bench.steps_stats([3.0] * 7, walls, [0.1] * 7, positions=1000, flops_per_token=6e6, peak_flops=1e12)
    assert s["steps_done"] == 7 and s["timed_steps"] == 4 and s["step_time_s"] == 0.5
    assert s["tokens_per_s"] == 2000.0 and s["mfu"] == pytest.approx(2000 * 6e6 / 1e12)
    assert s["collective_share"] == pytest.approx(0.2)
    assert gpu_bench.steps_stats([], [], [], 0, 1.0, None)["tokens_per_s"] is None
    assert gpu_bench.steps_stats([1.0], [2.0], [0.0], 10, 1.0, None)["step_time_s"] == 2.0   # too few: the last


def test_gpu_bench_compares_loss_curves():
    same = gpu_bench.compare_curves([2.0, 1.5], [2.0, 1.5], 1e-5, 1e-5)
    assert same["ok"] and same["max_step_rel"] == 0.0
    close = gpu_bench.compare_curves([2.02, 1.51], [2.0, 1.5], 0.05, 0.02)
    assert close["ok"] and close["max_step_rel"] == pytest.approx(0.01)
    assert not gpu_bench.compare_curves([2.2, 1.5], [2.0, 1.5], 0.05, 0.02)["ok"]
    assert not gpu_bench.compare_curves([2.0], [2.0, 1.5], 0.05, 0.02)["ok"]          # not the same steps
    assert not gpu_bench.compare_curves([float("nan")], [2.0], 0.05, 0.02)["ok"]
    assert not gpu_bench.compare_curves([], [], 0.05, 0.02)["ok"]


def test_gpu_peak_flops_of_the_lent_gpus():
    from orchestrator.monitoring.metrics import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12     # what torch names the SXM card
    assert gpu_peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert gpu_peak_flops("NVIDIA GH200 480GB", "bfloat16") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert gpu_peak_flops("NVIDIA H100 NVL", "float32") == 60e12


def test_gpu_bench_sweep_configs_load_and_fit_the_plan():
    """The sweep's configs are valid on one GPU and their memory plans fit an H100 (79.1 GiB, PLAN_FRACTION)."""
    from orchestrator.memory.plan import plan_memory

    for name, config, overrides in gpu_bench.SWEEP:
        cfg = gpu_bench.load(config, ("cluster.use_gpu=true", "cluster.num_devices=1", *overrides))
        assert plan_memory(cfg).peak().total <= gpu_bench.PLAN_FRACTION * 79.1 * 2 ** 30, name


def test_gpu_bench_cpu_dry_run(tmp_path, monkeypatch):
    """The flow end to end on CPU (tiny model, few steps): the smoke part (with its 2-process expert-parallel check)
    and one throughput job, results written after each run, the table printed."""
    monkeypatch.setattr(gpu_bench, "SMOKE_STEPS", 4)
    monkeypatch.setattr(gpu_bench, "OVERLAP_STEPS", 2)
    monkeypatch.setattr(gpu_bench, "WARMUP_STEPS", 1)
    assert gpu_bench.main(["--cpu-dry-run", "--only", "smoke,throughput", "--jobs", "default", "--budget-s", "300",
                           "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("gpu-*-cpu-dry-run.json")
    r = __import__("json").loads(result.read_text())
    assert r["env"]["info"]["process_group"]["ok"] and r["env"]["info"]["process_group"]["backend"] == "gloo"
    assert r["smoke"]["default_bf16"]["steps_done"] == 4 == r["smoke"]["default_float32"]["steps_done"]
    assert r["smoke"]["bf16_vs_float32"]["ok"], r["smoke"]["bf16_vs_float32"]
    assert r["smoke"]["overlap_equality"]["ok"] and r["smoke"]["overlap_equality"]["steps"] == 2
    ep = r["smoke"]["overlap_equality_ep"]   # 2 spawned processes over gloo, expert-parallel 2
    assert ep["ok"] and ep["steps"] == 2 and "error" not in ep, ep
    job = r["throughput"]["default"]
    assert job["steps_done"] == 5 and job["tokens_per_s"] > 0 and job["stopped"] == "steps"
    assert "sweep" not in r and (tmp_path / result.name.replace(".json", ".txt")).read_text().startswith("part")


def test_gpu_bench_watchdog_keeps_what_a_stuck_run_did(tmp_path, monkeypatch):
    """A step that outlasts the whole budget (a hung collective, say): SIGALRM stops it, the part and the
    interrupted run are recorded, the later parts are not begun, the results and the table are written."""
    import time as _time

    from orchestrator.device.shard import DeviceShard

    monkeypatch.setattr(gpu_bench, "GRACE_S", 0)
    monkeypatch.setattr(DeviceShard, "train_step", lambda self, step: _time.sleep(60))
    t0 = _time.monotonic()
    assert gpu_bench.main(["--cpu-dry-run", "--only", "smoke,throughput", "--budget-s", "4",
                           "--out", str(tmp_path)]) == 0
    assert _time.monotonic() - t0 < 30
    r = __import__("json").loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert "budget of 4 s" in r["smoke"]["stopped"]
    assert r["smoke"]["interrupted_run"]["stopped"] == "watchdog" and r["smoke"]["interrupted_run"]["steps_done"] == 0
    assert "throughput" not in r


def test_gpu_bench_fast_init_draws_the_same_distributions():
    """The sweep's fast init (the weights drawn on the device, not by the seed's CPU generators): every parameter
    with the std (norms: the constant) the project's init gives it, and a step trains."""
    from orchestrator.model.transformer import build_model

    cfg = tiny_config(None, "model.norm=sandwich")   # its output norms start at their own constants
    reference = dict(build_model(cfg.model, 0).named_parameters())
    with gpu_bench.no_host_init():
        model = build_model(cfg.model, 0)
    gpu_bench.device_init(model)
    assert build_model.__globals__["init_weights"].__name__ == "init_weights"   # restored
    for name, p in model.named_parameters():
        ref = reference[name]
        if name.endswith("norm.weight"):
            assert torch.equal(p, ref), name
        elif ref.numel() >= 4096:
            assert p.std().item() == pytest.approx(ref.std().item(), rel=0.1), name
            assert not torch.equal(p, ref)
