"""One metrics stream, many sinks: every step's record goes to metrics.jsonl (always), TensorBoard event
files, Prometheus through Ray's metrics API, and MLflow when asked for; incidents go to every sink too.

Events that are not a step's record go to metrics.jsonl as lines of their own, written when they happen,
each with the step it is about, and to every sink: `{"event": "checkpoint_committed", "step", "time",
"bytes", "seconds"}`, `{"event": "checkpoint_failed", "step", "time", "reason"}` and, for a save begun after
the last record (the final or stop checkpoint, a retake), `{"event": "checkpoint_started", "step", "time"}`;
a save begun with a step says so in that step's record (`checkpoint_started: true`).

The record is the driver's per-step dict (see README "The run directory"); `SCALARS` says which of its
keys each sink shows and under which name, so every sink carries the same values.

MFU (model FLOPs utilisation) = tokens/s x FLOPs per token / (devices x peak FLOP/s of one device), with
FLOPs per token = 6 x (parameters a token passes through, embedding lookup excluded) + 12 x layers x
dim x seq_len (attention scores and values, forward and backward), as in PaLM's appendix B. Under multi-head
latent attention (model.attention=mla) the scores are n_heads x (qk_nope_head_dim + qk_rope_head_dim) wide and
the values n_heads x v_head_dim: 6 x layers x seq_len x n_heads x (qk_head_dim + v_head_dim) (the same count:
2 FLOPs per multiply-add, forward QK^T and AV, backward twice that); its low-rank projections are parameters.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Protocol

from orchestrator.config import Config
from orchestrator.monitoring.listeners import RunListener

log = logging.getLogger(__name__)

MIB = float(2 ** 20)

# record key -> (TensorBoard tag, Prometheus metric name, description)
SCALARS: dict[str, tuple[str, str, str]] = {
    "loss": ("train/loss", "loss", "training loss (mean over the global batch)"),
    "val_loss": ("validation/loss", "val_loss", "validation loss on the held-out split"),
    "grad_norm": ("train/grad_norm", "grad_norm", "global gradient norm before clipping"),
    "lr": ("train/lr", "lr", "learning rate"),
    "aux_loss": ("train/aux_loss", "aux_loss", "balancing losses trained on (not part of loss)"),
    "mtp_loss": ("train/mtp_loss", "mtp_loss", "multi-token prediction CE, mean over depths (model.mtp_depth; "
                                               "trained on times model.mtp_weight, not part of loss)"),
    "tokens_per_s": ("throughput/tokens_per_s", "tokens_per_s", "tokens per second"),
    "step_time_s": ("throughput/step_time_s", "step_time_s", "wall time of the step"),
    "mfu": ("throughput/mfu", "mfu", "model FLOPs utilisation (0..1)"),
    "idle_share": ("throughput/idle_share", "idle_share", "share of the step the devices waited between steps "
                   "(idle_s / (idle_s + train_step), mean over devices)"),
    "maxvio": ("balance/maxvio", "maxvio", "max expert load / mean - 1, mean over MoE layers"),
    "device_imbalance": ("balance/device_imbalance", "device_imbalance", "max device load / mean"),
    "dead_fraction": ("balance/dead_fraction", "dead_fraction", "share of experts that got no token"),
    "dropped": ("balance/dropped", "dropped", "token copies dropped by capacity"),
    # RL post-training (data.task=rl): the rollouts (rl/service.py) and the device's RL step (device/rl.py)
    "reward_mean": ("rl/reward_mean", "reward_mean", "mean reward of the step's completions"),
    "accuracy": ("rl/accuracy", "accuracy", "share of the step's completions with the exact answer"),
    "response_len": ("rl/response_len", "response_len", "mean completion length (tokens)"),
    "clip_frac": ("rl/clip_frac", "clip_frac", "share of trained tokens whose ratio was clipped"),
    "staleness": ("rl/staleness", "staleness", "mean policy versions between sampling and training"),
    "routing_mismatch": ("rl/routing_mismatch", "routing_mismatch",
                         "share of token x MoE layer whose top-k set differs between rollout and trainer"),
    "replay_mismatch": ("rl/replay_mismatch", "replay_mismatch",
                        "the same for the expert ids the training forward used (0 with routing replay)"),
    "logprob_gap": ("rl/logprob_gap", "logprob_gap", "mean |logp_train - logp_rollout| over trained tokens"),
    "kl": ("rl/kl", "kl", "k3 KL to the reference policy"),
    "gen_s": ("rl/gen_s", "gen_s", "time generating the step's rollouts"),
    "sync_s": ("rl/sync_s", "sync_s", "time of the weight sync before the rollouts"),
    "sync_bytes": ("rl/sync_bytes", "sync_bytes", "bytes sent to the rollout engines by the weight sync"),
}


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token (forward + backward) of the whole model (see the module docstring)."""
    from orchestrator.model.transformer import count_parameters

    m = cfg.model
    if m.hf_path or m.hf_config:   # a transformers model: its parameters counted on the meta device
        from orchestrator.model.hf import hf_counts

        counts = hf_counts(m)
        active = counts["activated"] - (0 if counts["tied"] else m.vocab_size * m.dim)   # the lookup costs nothing
        return 6.0 * active + 12.0 * m.n_layers * m.dim * cfg.data.seq_len
    counts = count_parameters(m)
    active = counts["activated"] - (0 if m.tie_embeddings else m.vocab_size * m.dim)  # the lookup costs nothing
    if m.attention == "mla":
        width = m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
        return 6.0 * active + 6.0 * m.n_layers * width * cfg.data.seq_len
    return 6.0 * active + 12.0 * m.n_layers * m.dim * cfg.data.seq_len


# Dense peak TFLOP/s per GPU (bf16/fp16 tensor cores, float32 without TF32), by a substring of the device name; the
# first key found in the name wins, so longer names come before their prefixes (L40S before L4, A10G before A10:
# AWS's A10G has fewer tensor FLOPs than the A10; the H100's PCIe and NVL cards before the SXM's "NVIDIA H100 80GB
# HBM3"; NVIDIA's H100 datasheet, dense: SXM 989/67, NVL 835/60, PCIe 756/51; H200 (and GH200) as the H100 SXM).
GPU_PEAK_TFLOPS = {"H200": (989.0, 67.0), "H100 PCIe": (756.0, 51.0), "H100 NVL": (835.0, 60.0), "H100": (989.0, 67.0),
                   "A100": (312.0, 19.5), "L40S": (362.0, 91.6), "L4": (121.0, 30.3), "A10G": (70.0, 31.5),
                   "A10": (125.0, 31.2), "V100": (125.0, 15.7), "T4": (65.0, 8.1)}


def gpu_peak_flops(name: str, dtype: str) -> float | None:
    for key, (half, single) in GPU_PEAK_TFLOPS.items():
        if key in name:
            return (single if dtype in ("float32", "float64") else half) * 1e12
    return None


@functools.lru_cache(maxsize=None)
def cpu_peak_flops(threads: int, seconds: float = 0.3) -> float:
    """Measured (once per process): float32 matmuls on `threads` threads of this machine, what one CPU device can
    reach. On a loaded machine this reads low, and MFU high."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        a @ b
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            n += 1
        return n * 2 * 512 ** 3 / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def peak_flops(cfg: Config, gpu_name: str | None, mixed_precision: str) -> float | None:
    """Peak FLOP/s of one device: monitor.peak_tflops, else a known GPU's (bf16 peak when the devices autocast to
    bf16), else measured on this CPU."""
    if cfg.monitor.peak_tflops:
        return cfg.monitor.peak_tflops * 1e12
    if cfg.cluster.use_gpu:
        peak = gpu_peak_flops(gpu_name or "", "bfloat16" if mixed_precision == "bf16" else cfg.train.dtype)
        if peak is None:
            log.warning("MFU: peak FLOP/s of GPU %r unknown; set monitor.peak_tflops", gpu_name)
        return peak
    c = cfg.cluster
    return cpu_peak_flops(c.torch_threads or max(1, int(c.cpus_per_device)))


def idle_stats(reports: list[Any]) -> dict[str, float]:
    """The devices' idle time before this step (device/steptimes.py), means over the devices that timed their
    train_step: `idle_s` (seconds since each one's previous train_step ended: the driver's work between steps,
    Ray's hand-over, the device's other calls), `idle_share` = idle_s / (idle_s + busy), busy the train_step's own
    duration (ended_at - started_at), and `other_calls_s` (of idle_s, the devices' other calls: snapshot,
    validation, ...). Empty when no device timed its step (a DeviceShard stepped directly)."""
    timed = [r for r in reports if getattr(r, "ended_at", 0.0)]
    if not timed:
        return {}
    n = len(timed)
    idle = sum(r.idle_s for r in timed) / n
    busy = sum(r.ended_at - r.started_at for r in timed) / n
    return {"idle_s": idle, "idle_share": idle / (idle + busy) if idle + busy > 0 else 0.0,
            "other_calls_s": sum(r.other_calls_s for r in timed) / n}


def step_record(step: int, reports: list[Any], wall: float, placement: Any, peak: float | None,
                flops_per_token_: float) -> dict[str, Any]:
    """A completed step's record (one line of metrics.jsonl; see README "The run directory") from every device's
    StepReport, the step's wall time, the expert placement and, for MFU, one device's peak FLOP/s."""
    from orchestrator.experts.balancer import load_stats

    r0, world = reports[0], len(reports)
    rec = {"step": step, "loss": r0.loss, "grad_norm": r0.grad_norm, "lr": r0.lr, "tokens": r0.tokens,
           "tokens_per_s": r0.tokens / wall, "step_time_s": wall,
           "device_step_time_s": [r.compute_time_s for r in reports],
           "device_collective_s": [r.collective_s for r in reports],
           "device_rss_mb": [round(r.rss_bytes / 2**20, 1) for r in reports],
           "device_memory": [r.memory for r in reports],
           "aux_loss": r0.aux_loss, "dropped": r0.dropped, "expert_load": r0.expert_load,
           **load_stats(r0.expert_load, world, placement, r0.device_load), **idle_stats(reports),
           "time": time.time()}
    if peak:   # the work is every position the step computed (SFT: padding and prompts too), not the trained ones
        rec["mfu"] = (getattr(r0, "positions", 0) or r0.tokens) / wall * flops_per_token_ / (world * peak)
    if r0.skipped:
        rec["skipped"] = r0.skipped
    mtp = getattr(r0, "mtp_losses", None)
    if mtp:   # model.mtp_depth: the depths' mean CE, and each depth's when there are several (model/mtp.py)
        rec["mtp_loss"] = sum(mtp) / len(mtp)
        if len(mtp) > 1:
            rec.update({f"mtp_loss_{k}": v for k, v in enumerate(mtp, 1)})
    rec.update(getattr(r0, "extra", None) or {})   # an RL step's own numbers (device/rl.py)
    return rec


def describe_event(event: dict[str, Any]) -> str:
    """One line for a checkpoint event (TensorBoard's text, logs)."""
    what = event["event"].replace("checkpoint_", "checkpoint ")
    extra = {"checkpoint_committed": f" ({event.get('bytes', 0) / 1e6:.1f} MB, {event.get('seconds', 0):.2f}s)",
             "checkpoint_failed": f": {event.get('reason', '')}"}.get(event["event"], "")
    return f"step {event['step']}: {what}{extra}"


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def incident(self, incident: dict[str, Any]) -> None: ...

    def event(self, event: dict[str, Any]) -> None: ...

    def rewind(self, back: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Scalars (SCALARS, per-layer MaxVio, per-device step time, per-device memory by category in MiB as
    `memory/device{rank}/{category}`), histograms of the expert load per layer, incidents as text, under
    <run dir>/tensorboard. On a rewind (and at the first step of a run, resumed or in a reused run directory) a
    session-start event tells TensorBoard to drop the events from that step on, so a replayed step shows once, as
    metrics.jsonl does."""

    def __init__(self, path: Path, histogram_every: int, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(path), purge_step=first_step)
        self.histogram_every = histogram_every
        self.incidents = 0
        self.checkpoints = {"checkpoint_committed": 0, "checkpoint_failed": 0}
        self._excepthook = threading.excepthook
        threading.excepthook = self._writer_failed

    def _writer_failed(self, args) -> None:
        """TensorBoard writes from a thread of its own, which dies with a traceback on a full disk: one warning
        line instead (the sink's next call fails too, and is logged as any failing sink is)."""
        tb = traceback.extract_tb(args.exc_traceback) if args.exc_traceback else []
        if isinstance(args.exc_value, OSError) and any("tensorboard" in f.filename for f in tb):
            log.warning("TensorBoard's event writer stopped: %s", args.exc_value)
            return
        self._excepthook(args)

    def write(self, record: dict[str, Any]) -> None:
        """The record's scalars as one event (a Summary of many values, as tf.summary.merge_all writes them):
        one proto, one queued record and one checksum a step instead of one per scalar, which in the driver cost
        about 3.9 ms of CPU a step (26-key records, pure-Python CRC32C) against 0.4 ms now."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        step = record["step"]
        values = [(tag, record[key]) for key, (tag, _, _) in SCALARS.items() if record.get(key) is not None]
        values += [(f"balance/maxvio_layer_{layer}", v) for layer, v in enumerate(record.get("maxvio_layers") or [])]
        values += [(f"device/step_time_s/rank_{rank}", v)
                   for rank, v in enumerate(record.get("device_step_time_s") or [])]
        values += [(f"memory/device{rank}/{category}", nbytes / MIB)
                   for rank, memory in enumerate(record.get("device_memory") or [])
                   for category, nbytes in (memory or {}).items()]
        if values:
            self.w.file_writer.add_summary(
                Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values]), step)
        if self.histogram_every and step % self.histogram_every == 0:
            import numpy as np

            for layer, load in enumerate(record.get("expert_load") or []):
                self.w.add_histogram(f"balance/expert_load_layer_{layer}", np.asarray(load, dtype=float), step)

    def rewind(self, back: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.w.file_writer.add_event(Event(step=back + 1, session_log=SessionLog(status=SessionLog.START)))

    def incident(self, incident: dict[str, Any]) -> None:
        self.incidents += 1
        step = int(incident.get("step") or 0)
        self.w.add_scalar("incidents/total", self.incidents, step)
        self.w.add_text("incidents", f"{incident.get('kind')} on device {incident.get('rank')}: "
                        f"{incident.get('detail', '')} -> {incident.get('action', '')}", step)

    def event(self, event: dict[str, Any]) -> None:
        """Checkpoint events as text, and the running counts `checkpoints/committed` and `checkpoints/failed`."""
        step, kind = int(event["step"]), event["event"]
        if kind in self.checkpoints:
            self.checkpoints[kind] += 1
            self.w.add_scalar(f"checkpoints/{kind.removeprefix('checkpoint_')}", self.checkpoints[kind], step)
        self.w.add_text("checkpoints", describe_event(event), step)

    def close(self) -> None:
        try:
            self.w.close()
        finally:
            if threading.excepthook == self._writer_failed:
                threading.excepthook = self._excepthook


class PrometheusSink:
    """Gauges through `ray.util.metrics` (exported by the node's Ray metrics agent, prefixed `ray_`, so the Ray
    dashboard and a Prometheus scraping Ray show them; Grafana: cluster_configs/grafana-dashboard.json). Every
    series has a `run` label; per-layer, per-expert and per-device series have theirs (`device_memory_bytes`:
    `device` and `category`, the record's `device_memory`)."""

    def __init__(self, run: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"run": run}
        self.gauges = {key: Gauge(f"orchestrator_{name}", description=desc, tag_keys=("run",))
                       for key, (_, name, desc) in SCALARS.items()}
        self.step = Gauge("orchestrator_step", description="last completed step", tag_keys=("run",))
        self.layer_maxvio = Gauge("orchestrator_maxvio_layer", description="MaxVio of one MoE layer",
                                  tag_keys=("run", "layer"))
        self.expert_load = Gauge("orchestrator_expert_load", description="token copies an expert got in the last step",
                                 tag_keys=("run", "layer", "expert"))
        self.device_step = Gauge("orchestrator_device_step_time_s", description="a device's time in the last step",
                                 tag_keys=("run", "rank"))
        self.device_memory = Gauge("orchestrator_device_memory_bytes",
                                   description="bytes a device held in the last step, by category (params, grads, "
                                               "optimizer, activations_peak, rss)",
                                   tag_keys=("run", "device", "category"))
        self.incidents = Counter("orchestrator_incidents", description="incidents, by kind", tag_keys=("run", "kind"))
        self.checkpoints = Counter("orchestrator_checkpoints", description="checkpoints committed and failed",
                                   tag_keys=("run", "outcome"))
        self.committed = Gauge("orchestrator_checkpoint_committed_step", description="step of the newest committed "
                               "checkpoint", tag_keys=("run",))

    def write(self, record: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            if record.get(key) is not None:
                gauge.set(float(record[key]), tags=self.tags)
        self.step.set(float(record["step"]), tags=self.tags)
        for layer, value in enumerate(record.get("maxvio_layers") or []):
            self.layer_maxvio.set(value, tags={**self.tags, "layer": str(layer)})
        for layer, load in enumerate(record.get("expert_load") or []):
            for expert, count in enumerate(load):
                self.expert_load.set(float(count), tags={**self.tags, "layer": str(layer), "expert": str(expert)})
        for rank, value in enumerate(record.get("device_step_time_s") or []):
            self.device_step.set(value, tags={**self.tags, "rank": str(rank)})
        for rank, memory in enumerate(record.get("device_memory") or []):
            for category, nbytes in (memory or {}).items():
                self.device_memory.set(float(nbytes), tags={**self.tags, "device": str(rank), "category": category})

    def incident(self, incident: dict[str, Any]) -> None:
        self.incidents.inc(1.0, tags={**self.tags, "kind": str(incident.get("kind"))})

    def event(self, event: dict[str, Any]) -> None:
        if event["event"] in ("checkpoint_committed", "checkpoint_failed"):
            self.checkpoints.inc(1.0, tags={**self.tags, "outcome": event["event"].removeprefix("checkpoint_")})
        if event["event"] == "checkpoint_committed":
            self.committed.set(float(event["step"]), tags=self.tags)

    def rewind(self, back: int) -> None:
        pass   # gauges: the replay sets them again

    def close(self) -> None:
        pass


class MLflowSink:
    """The same scalars to MLflow (where: MLFLOW_TRACKING_URI, else MLflow's default), the config as params
    (secrets redacted: a tracking server is shared)."""

    def __init__(self, cfg: Config, run: str):
        import mlflow

        from orchestrator.config import redacted

        self.mlflow = mlflow
        mlflow.start_run(run_name=run)
        flat: dict[str, Any] = {}
        for section, values in redacted(cfg).items():
            if isinstance(values, dict):
                flat.update({f"{section}.{k}": v for k, v in values.items() if not isinstance(v, (list, dict))})
        mlflow.log_params(flat)

    def write(self, record: dict[str, Any]) -> None:
        self.mlflow.log_metrics({name: float(record[key]) for key, (_, name, _) in SCALARS.items()
                                 if record.get(key) is not None}, step=record["step"], synchronous=False)

    def incident(self, incident: dict[str, Any]) -> None:
        self.mlflow.log_metric("incidents", 1.0, step=int(incident.get("step") or 0), synchronous=False)

    def event(self, event: dict[str, Any]) -> None:
        if event["event"] in ("checkpoint_committed", "checkpoint_failed"):
            self.mlflow.log_metric(event["event"], 1.0, step=int(event["step"]), synchronous=False)

    def rewind(self, back: int) -> None:
        pass   # MLflow keeps every logged value; a replayed step is logged again

    def close(self) -> None:
        self.mlflow.end_run()


def check_sinks(cfg: Config) -> None:
    """Fail before training when a sink that is asked for cannot work."""
    from importlib.util import find_spec

    from orchestrator.config import ConfigError

    if cfg.monitor.mlflow and find_spec("mlflow") is None:
        raise ConfigError("monitor.mlflow=true but mlflow is not installed: `pip install mlflow`, "
                          "or set monitor.mlflow=false")
    if cfg.monitor.tensorboard and find_spec("tensorboard") is None:
        raise ConfigError("monitor.tensorboard=true but the tensorboard package is missing: "
                          "`pip install tensorboard`, or set monitor.tensorboard=false")


class MetricsStream(RunListener):
    """metrics.jsonl plus the sinks the config turns on. `write` every completed step, `incident` as decided,
    `event` as it happens (a checkpoint committed or failed), `truncate` on a rewind (metrics.jsonl keeps each
    step once; the other sinks show the replay over it). A full run directory raises DiskFull from `write` and
    `event` (metrics.jsonl is the record the run keeps); a sink that fails only logs. As a run's listener
    (listeners.py): records, incidents and checkpoint events."""

    def __init__(self, cfg: Config, run_dir: Path, first_step: int):
        from orchestrator.monitoring.status import MetricsLog

        self.log = MetricsLog(run_dir / "metrics.jsonl")   # the run directory was rewound to first_step - 1
        self.sinks: list[Sink] = []
        self.seconds = 0.0   # spent writing to the sinks (metrics.jsonl included): the monitoring's cost
        m, run = cfg.monitor, run_dir.name
        if m.tensorboard:
            self.sinks.append(TensorBoardSink(run_dir / "tensorboard", m.histogram_every, first_step))
        if m.prometheus:
            self.sinks.append(PrometheusSink(run))
        if m.mlflow:
            self.sinks.append(MLflowSink(cfg, run))

    def write(self, record: dict[str, Any]) -> None:
        self._line(record, "write")

    def incident(self, incident: dict[str, Any]) -> None:
        for sink in self.sinks:
            self._safely(sink.incident, incident)

    def event(self, event: dict[str, Any]) -> None:
        """An event line (see the module docstring) to metrics.jsonl, then to every sink."""
        self._line(event, "event")


    def _line(self, obj: dict[str, Any], method: str) -> None:
        """`obj` to metrics.jsonl (DiskFull when it cannot be written), then to each sink's `method` (a sink that
        fails only logs); the time spent is the monitoring's own cost."""
        t0 = time.perf_counter()
        self.log.write(obj)
        for sink in self.sinks:
            self._safely(getattr(sink, method), obj)
        self.seconds += time.perf_counter() - t0

    def truncate(self, back: int) -> None:
        self.log.truncate(back)
        for sink in self.sinks:
            self._safely(sink.rewind, back)

    on_record, on_incident, on_checkpoint, on_rewind = write, incident, event, truncate

    def validation(self, step: int, val_loss: float) -> None:
        """The validation loss scored after the last step (its record is written already): the sinks only."""
        for sink in self.sinks:
            self._safely(sink.write, {"step": step, "val_loss": val_loss})

    def close(self) -> None:
        self.log.close()
        for sink in self.sinks:
            self._safely(sink.close)

    @staticmethod
    def _safely(fn, *args) -> None:
        try:  # a sink that fails (a full disk for TensorBoard, an MLflow server away) never stops training
            fn(*args)
        except Exception as e:
            log.warning("metrics sink %s failed: %s", getattr(fn, "__qualname__", fn), e)


__all__ = ["MetricsStream", "SCALARS", "flops_per_token", "cpu_peak_flops", "gpu_peak_flops", "peak_flops", "step_record", "check_sinks"]
