"""The start of a run (Driver.start and Driver._starting call these): the data and tokenizer, the devices started
and checked against the memory plan, the run directory brought to the starting point, the monitoring opened.
Each function gets the objects it works on; none knows the Driver (the driver imports this module)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray

from orchestrator.checkpoint.coordinator import Checkpoints
from orchestrator.checkpoint.timeline import ResumePlan, plan_resume, record_run_id, retire
from orchestrator.config import Config, to_dict
from orchestrator.data.source import load_data, resolve_tokenizer
from orchestrator.device.group import DeviceGroup
from orchestrator.monitoring.alerts import AlertEngine
from orchestrator.monitoring.listeners import Listeners
from orchestrator.monitoring.metrics import MetricsStream, check_sinks, peak_flops
from orchestrator.monitoring.rundir import rewind_logs
from orchestrator.monitoring.status import Progress, write_memory_plan

log = logging.getLogger(__name__)


@dataclass
class Started:
    """What the started devices settled: the precision the hardware allows, one device's peak FLOP/s (for MFU;
    None when unknown)."""
    mixed_precision: str
    peak_flops: float | None


def check_before_start(cfg: Config, run_dir: Path, plan: ResumePlan | None, run_id: str | None) -> ResumePlan:
    """The sinks and frozen-parameter patterns checked, and where the run starts (`plan`, else planned now:
    timeline.plan_resume), its warnings logged; nothing is started or written yet."""
    check_sinks(cfg)
    if cfg.train.freeze:   # every pattern names a parameter (the jobs check it before Ray starts)
        from orchestrator.memory.plan import frozen_names

        frozen_names(cfg)
    plan = plan or plan_resume(cfg, run_dir, run_id)
    for warning in plan.warnings:
        log.warning("%s", warning)
    return plan


def start_devices(cfg: Config, run_dir: Path, plan: ResumePlan, devices: DeviceGroup,
                  checkpoints: Checkpoints) -> Started:
    """The data loaded and checked, the tokenizer saved, the checkpoint storage reached; then every device
    started and checked against the memory plan (ConfigError before any shard is built), and given what their
    shards are built from (the config with the settled precision, the data in Ray's object store: build())."""
    tokenizer = resolve_tokenizer(cfg)   # None: bytes; trained first when data.train_tokenizer asks
    corpus = load_data(cfg, tokenizer)
    corpus.check_vocab(cfg.model.vocab_size, cfg.data.path)
    ckpt = checkpoints
    if tokenizer is not None:   # in the run dir and beside local checkpoints: what export --hf ships with the model
        tokenizer.save_pretrained(str(Path(run_dir) / "tokenizer"))
        if ckpt.storage.local:
            tokenizer.save_pretrained(str(Path(ckpt.storage.root) / "tokenizer"))
    ckpt.storage.check()  # an unreachable checkpoint URI fails now, not at the first save
    if corpus.val is None:
        log.info("run %s: checkpoints in %s; data: %s", plan.run_id, ckpt.storage.shown, corpus.description)
    else:
        log.info("run %s: checkpoints in %s; data: %s, %d train / %d validation tokens", plan.run_id,
                 ckpt.storage.shown, corpus.description, len(corpus.train), len(corpus.val))
    devices.start()
    mixed_precision = devices.settle_mixed_precision()
    check_gpu_memory(cfg, devices.info, mixed_precision)
    ck = cfg.checkpoint
    if ck.every_steps or ck.at_end or ck.on_signal:
        devices.check_storage_reach(ckpt.storage)
    shard_cfg = to_dict(cfg)
    shard_cfg["train"]["mixed_precision"] = mixed_precision
    devices.shard_inputs = (shard_cfg, ray.put(corpus.train), ray.put(corpus.val))
    return Started(mixed_precision, peak_flops(cfg, devices.info[0].get("gpu_name"), mixed_precision))


def check_gpu_memory(cfg: Config, info: list[dict[str, Any]], mixed_precision: str) -> None:
    """The memory plan must fit each device's share of the smallest GPU (cluster.device_memory_gb unset), with
    the precision the devices settled on: else ConfigError (exit 2) before any shard is built."""
    c = cfg.cluster
    gpu_memory = [i["gpu_memory"] for i in info if i.get("gpu_memory")]
    if not (c.use_gpu and gpu_memory) or c.device_memory_gb:
        return
    from orchestrator.memory.plan import check_fits

    cfg = replace(cfg, train=replace(cfg.train, mixed_precision=mixed_precision))
    share = int(min(gpu_memory) * c.gpus_per_device)
    check_fits(cfg, share, f"{c.gpus_per_device:g} of the smallest GPU's {min(gpu_memory) / 2**30:.1f} GiB; "
                           f"set cluster.device_memory_gb to plan for another budget")


def log_devices(cfg: Config, devices: DeviceGroup) -> None:
    """One line for the group, one per device (its node, process and GPU)."""
    nodes = len({i["node_id"] for i in devices.info})
    spares = cfg.faults.standby
    log.info("devices: %d actors on %d node(s), backend %s%s", devices.world, nodes, devices.backend,
             f", {spares} warm standby" if spares else "")
    for rank, i in enumerate(devices.info):
        log.info("device %d: node %s (%s), pid %d%s", rank, str(i["node_id"])[:12], i["ip"], i["pid"],
                 f", GPU {i['gpu_ids']} {i['gpu_name']}" if i.get("gpu_name") else "")


def rewind_run_dir(cfg: Config, run_dir: Path, plan: ResumePlan, storage: Any) -> None:
    """Once the checkpoint resumed from is loaded (the run continues after it): the run's id and memory plan
    recorded, the abandoned timeline's checkpoints retired and the run directory's logs rewound."""
    record_run_id(run_dir, plan.run_id)
    write_memory_plan(run_dir, cfg)
    retire(storage, plan.retire, plan.step)
    rewind_logs(run_dir, plan.logs_through)


def open_monitoring(cfg: Config, run_dir: Path, first: int, listeners: Listeners
                    ) -> tuple[MetricsStream, AlertEngine, Progress]:
    """metrics.jsonl (and the sinks) and the alert rules, added to the listeners; the progress display."""
    metrics = MetricsStream(cfg, run_dir, first)
    m = cfg.monitor
    alerts = AlertEngine(m.alerts, run_dir / "alerts.jsonl", m.webhook_url, m.webhook_timeout_s, m.webhook_retries)
    alerts.on_fire = listeners.alert
    listeners.add(metrics, alerts)
    return metrics, alerts, Progress(cfg.train.steps, cfg.run.progress, first_step=first)


__all__ = ["check_before_start", "Started", "start_devices", "check_gpu_memory", "log_devices", "rewind_run_dir", "open_monitoring"]
