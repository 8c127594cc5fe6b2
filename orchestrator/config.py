"""The one typed config of a run: dataclasses + OmegaConf, validated before anything starts.

`load_config(path, overrides)` reads a YAML file (keys it does not know are errors), applies
dotlist overrides (`train.steps=50 model.num_experts=16`), and checks every value that would
otherwise fail late inside an actor. Every error is a `ConfigError` naming the key and the fix.

This module imports no torch and no Ray: validating a config costs nothing.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from orchestrator.fault_kinds import FaultKind

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "jobs" / "configs" / "default.yaml"
log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what to do."""


@dataclass
class ModelConfig:
    vocab_size: int = 256          # byte-level tokens by default
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256         # RoPE table length; data.seq_len must fit
    num_experts: int = 8           # routed experts per MoE layer
    top_k: int = 2
    expert_dim: int = 128          # hidden size of one routed SwiGLU expert
    num_shared_experts: int = 1    # 0 disables the shared expert; n>0 gives hidden n*expert_dim
    score_func: str = "softmax"    # softmax | sigmoid
    norm_topk_prob: bool = True    # renormalise the k gate values to sum to 1
    route_scale: float = 1.0
    first_k_dense: int = 1         # the first k layers use a dense SwiGLU instead of MoE
    dense_dim: int = 256           # hidden size of those dense layers
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # A Hugging Face MoE model instead of the native one (model/hf.py): a local directory with config.json and
    # *.safetensors, or a config.json file (fresh weights from the seed). The model's own config then gives
    # vocab_size, dim, n_layers, max_seq_len, num_experts, top_k and first_k_dense (its dense layers' count)
    # (filled in by validate); the native architecture keys above do nothing.
    hf_path: Optional[str] = None
    hf_config: Optional[str] = None


@dataclass
class DataConfig:
    path: Optional[str] = None     # None: the Python standard library's own source files
    format: str = "auto"           # auto | text | bin (uint16 tokens, nanoGPT style)
    seq_len: int = 128
    val_fraction: float = 0.05
    max_bytes: int = 0             # cap on text bytes read (0: no cap)
    # Tokenizers and post-training (orchestrator/data/source.py): null = the checkpoint's own tokenizer when
    # model.hf_path holds one, else bytes; "bytes"; or a tokenizer folder. train_tokenizer=V trains a byte-level
    # BPE of V tokens on the run's training text first (cached). task: pretrain | sft (records with `messages`,
    # loss on assistant tokens only; data.path null = instructions built from the standard library). pack: sft
    # samples packed into rows with per-document position ids. max_samples: cap on sft samples (0: all).
    tokenizer: Optional[str] = None
    train_tokenizer: int = 0
    task: str = "pretrain"
    pack: bool = False
    max_samples: int = 0


@dataclass
class TrainConfig:
    steps: int = 500
    global_batch_size: int = 16    # sequences per step, over all devices
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0         # global grad-norm clip (0 disables)
    eval_batches: int = 8          # validation batches scored at the end of the run (0: none) ...
    eval_every: int = 0            # ... and every this many steps (0: only at the end)
    dtype: str = "float32"         # parameter and compute dtype: float32 | float64 (float64: exactness checks)
    mixed_precision: str = "auto"  # bf16 autocast of the forward (parameters, gradients, optimizer stay in dtype):
                                   # auto (on GPUs that support bf16, off on CPU) | bf16 (also on CPU) | none
    resume: Optional[str] = None   # latest (the newest checkpoint of this run's live timeline that verifies) | a
                                   # checkpoint path/URI
    lr_horizon: Optional[int] = None  # the step the cosine decay ends at; None: train.steps at a fresh start, the
                                      # checkpoint's on resume (set it to change the schedule of a resumed run)
    micro_batches: int = 1         # gradient accumulation: each device's slice of the global batch in this many
                                   # forward/backward passes, one optimizer step (same math as the whole slice)
    resume_accept_changes: List[str] = field(default_factory=list)  # keys a resume may change although the run then
                                   # does not continue exactly (seed, data.seq_len, ...; see README "Resume")
    freeze: List[str] = field(default_factory=list)  # parameters kept as they are (fnmatch patterns over their
                                   # names, e.g. "*.router.*", "model.embed_tokens.*"; a wrong one lists them):
                                   # no gradient, no AdamW state or weight decay; checked against the model before start


@dataclass
class BalanceConfig:
    """Expert load balancing strategies; combinable (formulas in orchestrator/model/balancing.py)."""
    aux_loss_coeff: float = 0.0       # Switch/GShard auxiliary loss E*sum f_i P_i over the global batch (typical 0.01)
    seq_aux_loss_coeff: float = 0.0   # DeepSeek-V3 sequence-wise balance loss (DeepSeek-V3: 0.0001)
    z_loss_coeff: float = 0.0         # router z-loss (ST-MoE: 0.001)
    bias_update_speed: float = 0.0    # aux-loss-free router bias: +-speed toward the mean load after each step (DeepSeek-V3: 0.001)
    router_aux_loss_coeff: float = 0.0  # a transformers model's own router auxiliary loss (its load_balancing_loss_func,
                                        # over the global batch) times this (Mixtral's router_aux_loss_coef: 0.02)
    routing: str = "topk"             # topk | grouped (MoGE: top_k/num_groups experts from every group) | group_limited
                                      # (DeepSeek-V3: top_k among the experts of the topk_groups best groups)
    num_groups: int = 1               # expert groups (consecutive experts); one per device balances devices exactly
    topk_groups: int = 1              # group_limited: groups a token may use
    capacity_factor: float = 0.0      # 0: dropless; else each expert takes at most ceil(cf * T * top_k / E) copies
                                      # per sequence, its first ones in token order; the rest are dropped (and counted)
    replace_every: int = 0            # live expert re-placement: re-plan every R steps (0: off; experts stay contiguous)
    replace_window: int = 50          # ... from the mean load of the last this-many steps ...
    replace_min_gain: float = 0.02    # ... and migrate when the planned device max/mean load beats the current by this
    replace_on_imbalance: float = 0.0 # also re-plan when the device max/mean load of recent steps exceeds this (0: off),
                                      # at most once per replace_window steps
    redundant_experts: int = 0        # extra expert slots over all devices (a multiple of num_devices; as DeepSeek's
                                      # EPLB): re-placement fills them with replicas of hot experts, whose tokens are
                                      # split between the replicas and whose gradients are summed


@dataclass
class ParallelConfig:
    """The device mesh: cluster.num_devices = expert_parallel x data-parallel degree (orchestrator/parallel/mesh.py)."""
    expert_parallel: int = 0          # expert-parallel degree: devices one MoE layer's experts are split over; 0: the
                                      # largest divisor of num_devices that divides num_experts. The rest of the
                                      # devices is data parallelism (each group of expert_parallel devices a replica)


@dataclass
class MemoryConfig:
    """The memory puzzle: what each device holds (orchestrator/memory/plan.py predicts it; `python -m orchestrator plan`)."""
    zero_stage: int = 0               # 0: replicate dense state | 1: + optimizer states sharded | 2: + gradients
                                      # | 3: + parameters (FSDP full shard); dense over all devices, experts over
                                      # their data-parallel dimension
    activation_checkpointing: str = "none"  # none | selective (recompute attention and expert MLPs; routing and
                                      # all_to_all outputs kept) | full (recompute each block from its input)
    offload_optimizer: bool = False   # GPU only: AdamW states in host memory (torch FSDP2 CPUOffloadPolicy)


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None      # path or URI (s3://bucket/prefix, gs://...); None: <run.dir>/checkpoints
    every_steps: int = 0           # save every K steps (0: only at the end and on a stop signal)
    at_end: bool = True            # save when the run finishes
    on_signal: bool = True         # save after the step in flight on SIGTERM/SIGINT (ray job stop, preemption)
    keep_last: int = 3             # committed checkpoints kept (0: all)
    keep_every: int = 0            # also keep every M-th step's checkpoint for good (0: none)
    async_save: bool = True        # persist in the background while training goes on


# Settings that decide which data each step sees: a resume that changes one does not continue the run, and is
# refused unless train.resume_accept_changes names it (other training settings change with a warning).
RESUME_EXACT_KEYS = ("seed", "data.path", "data.format", "data.seq_len", "data.val_fraction", "data.max_bytes",
                     "data.tokenizer", "data.train_tokenizer", "data.task", "data.pack", "data.max_samples",
                     "train.global_batch_size")

FAULT_KINDS = tuple(FaultKind)  # the names: what each does is orchestrator/healing/faults.py FAULTS


@dataclass
class FaultSpec:
    kind: str                      # kill | crash | hang | slow | nan | node | checkpoint (see faults in the README)
    step: int = 0                  # the fault strikes during this step (0: use after_s)
    after_s: float = 0.0           # ... or in the first step that starts this long after training started
    rank: int = 0                  # the device it strikes (node: every device on that device's node); -1: random
    steps: int = 10                # slow: how many steps the delay lasts
    delay_s: float = 0.5           # slow: delay added to each of those steps
    repeat: int = 1                # strikes each of the first `repeat` times its step runs (a fault that comes back on replay)
    in_collective: bool = False    # hang: stuck inside a collective (its peers then all wait in one too), not in compute


@dataclass
class ChaosConfig:
    mean_steps_between: float = 0.0   # 0: off; else faults at random steps, this many steps apart on average
    kinds: List[str] = field(default_factory=lambda: ["kill", "crash", "hang", "slow", "nan", "checkpoint"])
    seed: int = 0                     # the same seed gives the same faults at the same steps on the same devices
    first_step: int = 5               # no chaos before this step
    slow_steps: int = 5               # slow faults: steps of delay ...
    slow_delay_s: float = 0.5         # ... of this many seconds each


@dataclass
class FaultConfig:
    plan: List[FaultSpec] = field(default_factory=list)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    snapshot_every: int = 1        # in-memory snapshot cadence (steps) recovery rewinds to; 0: no healing
    standby: int = 0               # warm spare device actors (started, torch imported): a replacement only joins and restores
    max_recoveries: int = 10       # recoveries within recovery_window_s before the run stops with a report
    recovery_window_s: float = 3600.0  # ... the window that budget is counted over (0: the whole run)
    max_repeats: int = 3           # the same step failing this many times stops the run (a deterministic fault)
    recovery_attempts: int = 3     # tries per recovery (a replacement that fails to start, ...) ...
    retry_backoff_s: float = 1.0   # ... waiting this long before the second, twice as long before the third
    recovery_timeout_s: float = 120.0
    hang_factor: float = 10.0      # step deadline: hang_factor x median of recent step times ...
    hang_floor_s: float = 10.0     # ... at least this ...
    hang_cap_s: float = 120.0      # ... at most this (also the deadline of warm-up steps, before there is a median)
    straggler_factor: float = 3.0  # a device whose own work (step time outside collectives) exceeds this x the others' median ...
    straggler_min_s: float = 0.05  # ... and the median by at least this ...
    straggler_patience: int = 3    # ... this many steps in a row is a straggler
    on_straggler: str = "replace"  # replace (with a fresh actor, from the snapshot of the step just done) | record
    on_nonfinite: str = "rollback" # non-finite loss or gradients: rollback (to the last snapshot; skip the batch if it repeats) | skip
    on_spike: str = "record"       # loss or grad-norm spike: record | rollback | skip
    loss_spike_factor: float = 3.0 # spike: loss above this x the median of the last spike_window steps ...
    grad_spike_factor: float = 10.0  # ... or grad norm above this x its median
    spike_window: int = 50
    checkpoint_retries: int = 3    # a failed checkpoint is retried after 1, 2, 4 ... steps; this many failures in a row stop the run


@dataclass
class ClusterConfig:
    num_devices: int = 2
    address: Optional[str] = None  # Ray address to join; None: RAY_ADDRESS, a live local cluster, or a new one
    placement_strategy: str = "PACK"   # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    cpus_per_device: float = 1.0   # fractional values share cores on a laptop
    use_gpu: bool = False          # one GPU bundle per device
    gpus_per_device: float = 1.0   # with use_gpu: below 1 several devices share a GPU (nccl cannot: they use gloo)
    backend: str = "auto"          # auto (nccl with GPUs, else gloo) | gloo | nccl
    torch_threads: int = 0         # 0: max(1, floor(cpus_per_device))
    device_memory_gb: float = 0.0  # memory budget of one device the plan must fit (GiB); 0: a GPU's total memory,
                                   # no check on CPU
    start_timeout_s: float = 180.0
    step_timeout_s: float = 300.0
    collective_timeout_s: float = 300.0


@dataclass
class RunConfig:
    dir: Optional[str] = None      # None: runs/<time>-<name>
    name: str = "train"
    id: Optional[str] = None       # the run's identity (its checkpoints live under <checkpoint.dir>/<id>); None: the
                                   # one recorded in <run.dir>/run.json, else a new <name>-<date>-<time>-<hex>
    progress: str = "auto"         # auto (bar on a terminal, lines otherwise) | bar | lines | quiet


@dataclass
class AlertRule:
    """One alert rule (conditions and actions: orchestrator/monitoring/alerts.py)."""
    rule: str = "loss_spike"   # nonfinite | loss_spike | grad_spike | maxvio | straggler | throughput_drop | restarts
                               # | checkpoint_age | checkpoint_failed | restore_failed
    threshold: Optional[float] = None  # None: the rule's default (see alerts.py)
    steps: int = 1             # consecutive steps the condition must hold before the alert fires
    window: int = 20           # steps of history: the moving median (spikes, throughput), recoveries counted (restarts)
    action: str = "notify"     # record | notify | rollback | skip | stop


def _default_alerts() -> list[AlertRule]:
    return [AlertRule("nonfinite"), AlertRule("loss_spike", 3.0), AlertRule("grad_spike", 10.0),
            AlertRule("straggler", 1.5, steps=5), AlertRule("throughput_drop", 0.5, steps=5),
            AlertRule("restarts", 3.0, window=100), AlertRule("maxvio", 1.0, steps=50, action="record"),
            AlertRule("checkpoint_age", 1000.0, action="record"), AlertRule("checkpoint_failed"),
            AlertRule("restore_failed")]


@dataclass
class MonitorConfig:
    """Where the metrics stream goes besides metrics.jsonl (always), and what MFU is measured against."""
    tensorboard: bool = True          # TensorBoard event files in <run dir>/tensorboard
    prometheus: bool = True           # Ray's metrics API (ray.util.metrics): Prometheus endpoint, Ray dashboard, Grafana
    mlflow: bool = False              # also log to MLflow (needs `pip install mlflow`; where: MLFLOW_TRACKING_URI)
    histogram_every: int = 10         # TensorBoard histograms (expert load per layer) every this many steps (0: none)
    report: bool = True               # write <run dir>/report.html (plots; `python -m orchestrator report`) at the end
    peak_tflops: float = 0.0          # peak TFLOP/s of one device for MFU; 0: a table of known GPUs, on CPU measured
                                      # at start (a float32 matmul on the threads one device uses)
    alerts: list[AlertRule] = field(default_factory=_default_alerts)  # rules checked after every step
    webhook_url: Optional[str] = None # notify alerts are also POSTed here as JSON (Slack-style hooks, PagerDuty, ...)
    webhook_timeout_s: float = 5.0
    webhook_retries: int = 3


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    run: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Config from the structured defaults, then the YAML file, then `key=value` overrides.

    Keys from the dataclass defaults and from the default config file (DEFAULT_CONFIG: what the jobs read when
    --config is not given) are defaults; keys from another --config file and from overrides are the user's. A
    user's key that has no effect under the chosen options is refused (every one of them, in one ConfigError); a
    default that does not apply resolves to what does, said once in the log. Raises ConfigError (one line, naming
    the key, the file and its 1-based line where there is one)."""
    merged: DictConfig = OmegaConf.structured(Config)
    user: set[str] = set()
    if path is not None:
        data = _read_yaml(Path(path))
        merged = _merge(merged, data, f"config file {path}", Path(path))
        if not _is_default_file(Path(path)):
            user |= _dotted_keys(data)
    for item in overrides or []:
        extra = _parse_override(item)
        merged = _merge(merged, extra, f"override {item!r}")
        user |= _dotted_keys(extra)
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:   # a missing mandatory field (a fault without kind), an interpolation
        key = getattr(e, "full_key", None)
        raise ConfigError(f"bad value for '{key}': {str(e).splitlines()[0]}") from None
    resolved = validate(cfg, frozenset(user))
    if resolved:
        log.info("defaults that do not apply here resolve to what does: %s", "; ".join(resolved))
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (how actors receive it)."""
    cfg: Config = OmegaConf.to_object(_merge(OmegaConf.structured(Config), OmegaConf.create(data), "config"))  # type: ignore[assignment]
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _is_default_file(path: Path) -> bool:
    try:
        return path.resolve() == DEFAULT_CONFIG.resolve()
    except OSError:
        return False


def _dotted_keys(data: DictConfig) -> set[str]:
    """Every leaf key of a config file or override as a dotted path (a list is one leaf: `faults.plan`)."""
    out: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif prefix:
            out.add(prefix)

    walk(OmegaConf.to_container(data, resolve=False), "")
    return out


def _yaml_error(e: Exception, lines: bool = True) -> str:
    """A YAML parser's error as one line, with 1-based line and column numbers (yaml's marks count from 0);
    lines=False: columns only (an override's value is one line, and its end of stream counts as the next)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark, context, cmark = (getattr(e, n, None) for n in ("problem_mark", "context", "context_mark"))

    def at(m: Any) -> str:
        return f"line {m.line + 1}, column {m.column + 1}" if lines else f"column {m.column + 1}"

    where = f"{at(mark)}: " if mark is not None and (lines or cmark is None) else ""
    if context:
        return f"{where}{problem} ({context}{f' at {at(cmark)}' if cmark is not None else ''})"
    return f"{where}{problem}"


def _parse_override(item: str) -> DictConfig:
    """One `key=value` override; its value is YAML (`[1, 2]`, `{kind: kill}`, a quoted string)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (for example train.steps=50)")
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        value = item.split("=", 1)[1]
        raise ConfigError(f"override {item!r}: its value {value!r} is not valid YAML ({_yaml_error(e, False)}); close "
                          f"its brackets and quotes, or quote the whole value (key='...')") from None


def _read_yaml(path: Path) -> DictConfig:
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file such as {DEFAULT_CONFIG}")
    try:
        data = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_error(e)}; fix that line (indent with "
                          f"spaces, close brackets and quotes, quote values holding ': ' or ' #')") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, train:, ...), not a list")
    return data


def _key_line(path: Path, key: str | None) -> int | None:
    """The 1-based line of dotted `key` in the YAML file `path` (the deepest part of it found), or None."""
    import yaml

    if not key:
        return None
    try:
        node = yaml.compose(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    line = None
    for part in re.split(r"\.|\[", key):
        part = part.rstrip("]")
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == part), None)
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _merge(base: DictConfig, extra: DictConfig, where: str, file: Path | None = None) -> DictConfig:
    try:
        return OmegaConf.merge(base, extra)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = getattr(e, "full_key", None) or str(e)
        line = _key_line(file, key) if file is not None else None
        raise ConfigError(f"{where}: unknown config key '{key}'{f' (line {line})' if line else ''}; known sections "
                          f"are {', '.join(Config.__dataclass_fields__)} (see {DEFAULT_CONFIG} for every key)") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        line = _key_line(file, key) if file is not None else None
        what = f"bad value for '{key}'" if key else "bad value"
        raise ConfigError(f"{where}{f', line {line}' if line else ''}: {what}: {msg}") from None


def _positive(cfg: Config, keys: list[str], allow_zero: bool = False) -> None:
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < 0 or (value == 0 and not allow_zero):
            need = "zero or more" if allow_zero else "positive"
            raise ConfigError(f"{key}={value} must be {need}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def validate(cfg: Config, user_keys: frozenset[str] | None = None) -> list[str]:
    """Check everything that would otherwise fail inside an actor. `user_keys`: the dotted keys the user set
    (None: every key counts as set by the user). Returns the defaults resolved to what applies, one line each
    (the caller logs them). Raises ConfigError: the first bad value, or every key set by the user that has no
    effect under the chosen options, all in one message."""
    m, d, t, c = cfg.model, cfg.data, cfg.train, cfg.cluster
    keys = _Keys(user_keys)
    if m.hf_path or m.hf_config:
        _resolve_hf_model(cfg, keys)
    _positive(cfg, ["model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.max_seq_len",
                    "model.num_experts", "model.top_k", "model.expert_dim", "model.dense_dim",
                    "model.rope_theta", "model.norm_eps", "model.init_std", "model.route_scale",
                    "data.seq_len", "train.steps", "train.global_batch_size", "train.lr",
                    "cluster.num_devices", "cluster.cpus_per_device", "cluster.start_timeout_s",
                    "cluster.step_timeout_s", "cluster.collective_timeout_s"])
    _positive(cfg, ["model.num_shared_experts", "model.first_k_dense", "train.warmup_steps",
                    "train.weight_decay", "train.grad_clip", "train.eval_batches", "data.max_bytes",
                    "cluster.torch_threads", "checkpoint.every_steps", "checkpoint.keep_last",
                    "checkpoint.keep_every"], allow_zero=True)
    if cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed} must be zero or more")
    _choice("model.score_func", m.score_func, ("softmax", "sigmoid"))
    _choice("data.format", d.format, ("auto", "text", "bin"))
    _choice("train.dtype", t.dtype, ("float32", "float64"))
    _choice("train.mixed_precision", t.mixed_precision, ("auto", "bf16", "none"))
    if t.mixed_precision == "bf16" and t.dtype == "float64":
        raise ConfigError("train.mixed_precision='bf16' with train.dtype='float64': float64 runs are the exact "
                          "reference; use train.dtype=float32 for bf16 autocast, or train.mixed_precision=none")
    if not 0.0 < c.gpus_per_device <= 1.0:
        raise ConfigError(f"cluster.gpus_per_device={c.gpus_per_device} must be in (0, 1]: 1 gives every device a "
                          f"GPU of its own, a fraction lets several devices share one (a device uses one GPU)")
    _choice("cluster.placement_strategy", c.placement_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    _choice("cluster.backend", c.backend, ("auto", "gloo", "nccl"))
    _choice("run.progress", cfg.run.progress, ("auto", "bar", "lines", "quiet"))
    if m.top_k > m.num_experts:
        raise ConfigError(f"model.top_k={m.top_k} is larger than model.num_experts={m.num_experts}; "
                          f"a token cannot choose more experts than exist: lower model.top_k")
    _validate_mesh(cfg)
    if t.global_batch_size % c.num_devices:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by cluster.num_devices="
                          f"{c.num_devices}; each device takes an equal slice of the global batch")
    if not (m.hf_path or m.hf_config) and (m.dim % m.n_heads or (m.dim // m.n_heads) % 2):
        raise ConfigError(f"model.dim={m.dim} must split into model.n_heads={m.n_heads} heads of even size (for RoPE)")
    if m.first_k_dense > m.n_layers:
        raise ConfigError(f"model.first_k_dense={m.first_k_dense} exceeds model.n_layers={m.n_layers}")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; raise model.max_seq_len")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be between 0 and 1 (exclusive)")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be between 0 and 1")
    if d.path is not None and not Path(d.path).expanduser().exists():
        raise ConfigError(f"data.path={d.path!r} does not exist; give a text file, a folder of text files or a "
                          f"uint16 .bin token file, or leave data.path unset for the embedded stdlib corpus")
    if d.format == "bin" and d.path is None:
        raise ConfigError("data.format='bin' needs data.path pointing to a uint16 token file")
    _validate_tokens(cfg, keys)
    if cfg.balance.router_aux_loss_coeff and not (m.hf_path or m.hf_config):
        raise ConfigError(f"balance.router_aux_loss_coeff={cfg.balance.router_aux_loss_coeff} is a transformers "
                          f"model's own loss (model.hf_path / model.hf_config); the native model's Switch loss is "
                          f"balance.aux_loss_coeff")
    _validate_balance(cfg)
    _validate_faults(cfg)
    _validate_run(cfg)
    _positive(cfg, ["monitor.histogram_every", "monitor.peak_tflops", "train.eval_every", "monitor.webhook_retries"],
              allow_zero=True)
    _positive(cfg, ["monitor.webhook_timeout_s"])
    for i, a in enumerate(cfg.monitor.alerts):
        _choice(f"monitor.alerts[{i}].rule", a.rule, ("nonfinite", "loss_spike", "grad_spike", "maxvio", "straggler",
                                                      "throughput_drop", "restarts", "checkpoint_age",
                                                      "checkpoint_failed", "restore_failed"))
        _choice(f"monitor.alerts[{i}].action", a.action, ("record", "notify", "rollback", "skip", "stop"))
        if a.steps < 1 or a.window < 1 or (a.threshold is not None and a.threshold < 0):
            raise ConfigError(f"monitor.alerts[{i}] ({a.rule}): steps and window must be at least 1 and threshold "
                              f"zero or more (got steps={a.steps}, window={a.window}, threshold={a.threshold})")
        if a.rule == "checkpoint_failed" and a.action in ("rollback", "skip"):
            raise ConfigError(f"monitor.alerts[{i}] (checkpoint_failed) action={a.action}: a failed checkpoint is no "
                              f"step to rewind (the healer retakes it); use record, notify or stop")
        if a.action in ("rollback", "skip") and cfg.faults.snapshot_every == 0:
            raise ConfigError(f"monitor.alerts[{i}] ({a.rule}) action={a.action} rewinds to a snapshot, but "
                              f"faults.snapshot_every=0 turns snapshots off")
    url = cfg.monitor.webhook_url
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"monitor.webhook_url={redact_url(url, keep_path=False)!r} must be an http:// or https:// URL")
    if cfg.train.eval_every and not cfg.train.eval_batches:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every} needs train.eval_batches > 0 (batches scored each time)")
    if c.backend == "nccl" and not c.use_gpu:
        raise ConfigError("cluster.backend='nccl' needs cluster.use_gpu=true (nccl runs on GPUs only)")
    _refuse_idle_keys(cfg, keys)
    keys.raise_refused()
    return keys.resolved


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_source(cfg: Config) -> str | None:
    """The tokenizer folder a run reads (None: bytes, or one trained into the cache: data/source.py):
    data.tokenizer when it names a folder, else model.hf_path when that holds tokenizer files."""
    d, m = cfg.data, cfg.model
    if d.tokenizer == "bytes":
        return None
    if d.tokenizer:
        return d.tokenizer
    if m.hf_path and not d.train_tokenizer and any((Path(m.hf_path).expanduser() / f).is_file()
                                                   for f in TOKENIZER_FILES):
        return m.hf_path
    return None


def _validate_tokens(cfg: Config, keys: _Keys) -> None:
    """The tokenizer, the task and packing (orchestrator/data/source.py)."""
    m, d = cfg.model, cfg.data
    _choice("data.task", d.task, ("pretrain", "sft"))
    _positive(cfg, ["data.train_tokenizer", "data.max_samples"], allow_zero=True)
    if d.task == "pretrain":
        keys.section(cfg, "data", ("pack", "max_samples"), "with data.task=pretrain (they shape SFT samples): "
                                                           "remove it, or set data.task=sft")
    folder = tokenizer_source(cfg)
    if folder is None and not d.train_tokenizer:   # bytes
        if d.task == "sft":
            raise ConfigError("data.task=sft renders conversations with a tokenizer's chat template: set data.tokenizer "
                              "to a tokenizer folder, or data.train_tokenizer to a vocabulary size to train one")
        if (d.path is None or d.format == "text") and m.vocab_size < 256:
            raise ConfigError(f"model.vocab_size={m.vocab_size} is too small for byte-level text; it must be at "
                              f"least 256" + (" (the byte corpus needs 256 byte tokens; give data.tokenizer a tokenizer "
                                              "folder)" if m.hf_path or m.hf_config else ""))
        return
    if d.train_tokenizer and d.train_tokenizer > m.vocab_size:
        raise ConfigError(f"data.train_tokenizer={d.train_tokenizer} is larger than the model's vocabulary "
                          f"({m.vocab_size}): lower it, or raise the model's vocab_size")
    if folder is not None and not d.train_tokenizer and not Path(folder).expanduser().is_dir():
        raise ConfigError(f"data.tokenizer={folder!r} is not a folder; give a tokenizer folder (tokenizer.json, "
                          f"tokenizer_config.json), \"bytes\", or data.train_tokenizer=V to train one there")
    if d.task == "pretrain" and d.path is None:
        raise ConfigError("a tokenizer with the embedded corpus: the embedded corpus is byte-level; set data.path to "
                          "text / jsonl / parquet / arrow files, or data.tokenizer=bytes")
    if d.format != "auto":
        raise ConfigError(f"data.format={d.format!r} applies to byte-level data; with a tokenizer the files are read "
                          f"by their suffix (.txt .md .jsonl .json .parquet .arrow): remove it")
    if d.pack and not (m.hf_path or m.hf_config):
        raise ConfigError("data.pack=true needs position ids the native model does not take; pack with a "
                          "transformers model (model.hf_path / model.hf_config), or set data.pack=false")


# Native architecture keys a Hugging Face model's own config replaces (model/hf.py reads none of them).
_NATIVE_ONLY = ("n_heads", "expert_dim", "num_shared_experts", "score_func", "norm_topk_prob", "route_scale",
                "dense_dim", "tie_embeddings", "rope_theta", "norm_eps", "init_std")
# first_k_dense: how many of its layers are dense (n_layers minus its MoE layers: what the balancer counts)
_FROM_HF = ("vocab_size", "dim", "n_layers", "max_seq_len", "num_experts", "top_k", "first_k_dense")


def _resolve_hf_model(cfg: Config, keys: _Keys) -> None:
    """model.hf_path / model.hf_config: read the model's config (transformers, locally), check that its experts
    can be sharded, and fill the model keys the rest of the run reads from it. Refuses what does not apply to
    a transformers model yet, naming the key."""
    m, b = cfg.model, cfg.balance
    if m.hf_path and m.hf_config:
        raise ConfigError(f"model.hf_path={m.hf_path!r} and model.hf_config={m.hf_config!r} are both set: hf_path "
                          f"loads a checkpoint (its config.json included), hf_config starts fresh weights; set one")
    key = "model.hf_path" if m.hf_path else "model.hf_config"
    from orchestrator.model.hf import hf_summary

    info = hf_summary(m)
    for name in _NATIVE_ONLY + _FROM_HF:   # (a value equal to the model's own passes: validate runs again on it)
        if getattr(m, name) != info.get(name, _default_of(ModelConfig, name)):
            keys.check(m, name, f"model.{name}", _default_of(ModelConfig, name),
                       f"model.{name}={getattr(m, name)!r} has no effect with {key}: the Hugging Face config defines "
                       f"the architecture ({info['class']}); remove it (or change its config.json)",
                       f"{info['class']}'s config.json defines the architecture")
    for name in _FROM_HF:
        setattr(m, name, info[name])
    # What the transformers path does not do (yet): the model's router is its own; recomputation is the native
    # block's; the project's balancing losses read the native router's scores.
    for name, why in (("routing", "the model's own router picks experts (group-limited top-k, hash routing: as "
                                  "its config says)"),
                      ("capacity_factor", "a transformers model routes dropless"),
                      ("aux_loss_coeff", "the project's balancing losses read the native router's scores"),
                      ("seq_aux_loss_coeff", "the project's balancing losses read the native router's scores"),
                      ("z_loss_coeff", "the project's balancing losses read the native router's scores")):
        keys.check(b, name, f"balance.{name}", _default_of(BalanceConfig, name),
                   f"balance.{name}={getattr(b, name)!r} does not apply with {key}: {why}; remove it",
                   f"with {key}: {why}")
    if not info["router_aux_loss"]:
        keys.check(b, "router_aux_loss_coeff", "balance.router_aux_loss_coeff", 0.0,
                   f"balance.router_aux_loss_coeff={b.router_aux_loss_coeff}: {info['class']} computes no router "
                   f"auxiliary loss (its transformers module has no load_balancing_loss_func): remove it",
                   f"{info['class']} computes no router auxiliary loss")
    if b.router_aux_loss_coeff and cfg.train.micro_batches > 1:
        raise ConfigError(f"balance.router_aux_loss_coeff with train.micro_batches={cfg.train.micro_batches}: the loss "
                          f"weighs each expert by its share of the whole step's routed copies, known only after the "
                          f"last micro-batch's forward; set train.micro_batches=1 (or use balance.bias_update_speed)")
    if not info["correction_bias"]:
        keys.check(b, "bias_update_speed", "balance.bias_update_speed", 0.0,
                   f"balance.bias_update_speed={b.bias_update_speed} needs routers with a correction bias "
                   f"(e_score_correction_bias, as DeepSeek-V3/V4 have); {info['class']} has none: remove it",
                   f"{info['class']}'s routers have no correction bias to move")
    if cfg.data.pack and info["packing_leaks"]:
        raise ConfigError(f"data.pack=true with {info['class']}: packed samples would see each other, "
                          f"{info['packing_leaks']}; set data.pack=false (one sample per row)")
    if cfg.memory.activation_checkpointing == "selective":
        raise ConfigError(f"memory.activation_checkpointing='selective' is the native block's (its regions cut "
                          f"inside the block); with {key} each decoder layer is recomputed whole: set full or none")


def _validate_faults(cfg: Config) -> None:
    f, t, c = cfg.faults, cfg.train, cfg.cluster
    for i, spec in enumerate(f.plan):
        key = f"faults.plan[{i}]"
        _choice(f"{key}.kind", spec.kind, FAULT_KINDS)
        if spec.step and not 1 <= spec.step <= t.steps:
            raise ConfigError(f"{key}.step={spec.step} is outside the run's steps 1..{t.steps}")
        if not spec.step and spec.after_s <= 0:
            raise ConfigError(f"{key} needs a step (1..{t.steps}) or after_s > 0 (seconds into training)")
        if not -1 <= spec.rank < c.num_devices:
            raise ConfigError(f"{key}.rank={spec.rank} is not a device (0..{c.num_devices - 1}, or -1 for a random one)")
        if spec.repeat < 1:
            raise ConfigError(f"{key}.repeat={spec.repeat} must be 1 or more")
        if spec.kind == "slow" and (spec.steps < 1 or spec.delay_s <= 0):
            raise ConfigError(f"{key}: a slow fault needs steps >= 1 and delay_s > 0 (got {spec.steps}, {spec.delay_s})")
    ch = f.chaos
    if ch.mean_steps_between < 0:
        raise ConfigError(f"faults.chaos.mean_steps_between={ch.mean_steps_between} must be zero (off) or more")
    if ch.mean_steps_between:
        if not ch.kinds:
            raise ConfigError("faults.chaos.kinds is empty; list fault kinds such as [kill, crash, hang]")
        for i, kind in enumerate(ch.kinds):
            _choice(f"faults.chaos.kinds[{i}]", kind, FAULT_KINDS)
        if ch.slow_steps < 1 or ch.slow_delay_s <= 0:
            raise ConfigError("faults.chaos.slow_steps must be >= 1 and faults.chaos.slow_delay_s > 0")
    _positive(cfg, ["faults.snapshot_every", "faults.standby", "faults.max_recoveries", "faults.retry_backoff_s",
                    "faults.recovery_window_s",
                    "faults.checkpoint_retries", "faults.straggler_min_s"], allow_zero=True)
    _positive(cfg, ["faults.max_repeats", "faults.recovery_attempts", "faults.recovery_timeout_s",
                    "faults.hang_factor", "faults.hang_floor_s", "faults.hang_cap_s", "faults.straggler_factor",
                    "faults.straggler_patience", "faults.loss_spike_factor", "faults.grad_spike_factor",
                    "faults.spike_window"])
    if f.hang_floor_s > f.hang_cap_s:
        raise ConfigError(f"faults.hang_floor_s={f.hang_floor_s} exceeds faults.hang_cap_s={f.hang_cap_s}")
    _choice("faults.on_straggler", f.on_straggler, ("replace", "record"))
    _choice("faults.on_nonfinite", f.on_nonfinite, ("rollback", "skip"))
    _choice("faults.on_spike", f.on_spike, ("record", "rollback", "skip"))
    needs_snapshots = [s.kind for s in f.plan if s.kind != "checkpoint"] + (list(ch.kinds) if ch.mean_steps_between else [])
    if f.snapshot_every == 0 and needs_snapshots:
        raise ConfigError(f"faults.snapshot_every=0 turns healing off, but faults are planned ({', '.join(sorted(set(needs_snapshots)))}); "
                          f"set faults.snapshot_every to 1 (or more)")


def is_frozen(name: str, patterns: list[str]) -> bool:
    """Does train.freeze (`patterns`, fnmatch, case-sensitive) name the parameter `name`?"""
    from fnmatch import fnmatchcase

    return any(fnmatchcase(name, p) for p in patterns)


def mesh_shape(cfg: Config) -> tuple[int, int]:
    """(expert-parallel degree, data-parallel degree) of the device mesh; their product is cluster.num_devices.
    parallel.expert_parallel=0 takes the largest divisor of num_devices that divides num_experts (8 experts on 4
    devices: EP 4; 2 experts on 4 devices: EP 2 x DP 2; 8 experts on 16 devices: EP 8 x DP 2)."""
    world, ep = cfg.cluster.num_devices, cfg.parallel.expert_parallel
    if not ep:
        ep = math.gcd(world, cfg.model.num_experts)
    return ep, max(1, world // ep)


def expert_slots(cfg: Config) -> int:
    """Expert slots per device of each MoE layer: its share of the experts plus its share of the redundant ones
    (experts are split over the expert-parallel dimension; data-parallel replicas hold the same slots)."""
    ep, _ = mesh_shape(cfg)
    return (cfg.model.num_experts + cfg.balance.redundant_experts) // ep


def _validate_mesh(cfg: Config) -> None:
    m, c, t, mem = cfg.model, cfg.cluster, cfg.train, cfg.memory
    _positive(cfg, ["parallel.expert_parallel", "cluster.device_memory_gb"], allow_zero=True)
    _positive(cfg, ["train.micro_batches"])
    ep = cfg.parallel.expert_parallel
    if ep and (c.num_devices % ep or m.num_experts % ep):
        raise ConfigError(f"parallel.expert_parallel={ep} must divide both cluster.num_devices={c.num_devices} (the "
                          f"rest is data parallelism) and model.num_experts={m.num_experts} (every device of an "
                          f"expert-parallel group holds the same number of experts); 0 picks "
                          f"{math.gcd(c.num_devices, m.num_experts)}")
    if mem.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"memory.zero_stage={mem.zero_stage} must be 0 (replicate), 1 (shard optimizer states), "
                          f"2 (+ gradients) or 3 (+ parameters)")
    _choice("memory.activation_checkpointing", mem.activation_checkpointing, ("none", "selective", "full"))
    local = t.global_batch_size // c.num_devices
    if t.micro_batches > 1 and local % t.micro_batches:
        raise ConfigError(f"train.micro_batches={t.micro_batches} does not divide each device's slice of the batch "
                          f"(train.global_batch_size={t.global_batch_size} / cluster.num_devices={c.num_devices} = "
                          f"{local} sequences): choose a divisor of {local}")
    if t.micro_batches > 1 and cfg.balance.aux_loss_coeff:
        raise ConfigError(f"balance.aux_loss_coeff={cfg.balance.aux_loss_coeff} with train.micro_batches="
                          f"{t.micro_batches}: the Switch loss multiplies each expert's token count over the whole "
                          f"step by its router probabilities, so its gradient in the first micro-batch needs counts of "
                          f"the last; use balance.seq_aux_loss_coeff (per sequence: exact under micro-batching) or "
                          f"balance.bias_update_speed, or train.micro_batches=1")
    if mem.zero_stage >= 2 and c.use_gpu and (c.backend == "gloo" or c.gpus_per_device < 1):
        raise ConfigError(f"memory.zero_stage={mem.zero_stage} on GPUs that talk over gloo (cluster.backend="
                          f"{c.backend}, cluster.gpus_per_device={c.gpus_per_device:g}): FSDP2 shards on the device "
                          f"type of its mesh, and gloo's is the CPU; give every device a GPU of its own with nccl "
                          f"(cluster.gpus_per_device=1, cluster.backend=auto), or memory.zero_stage=1")
    _, dp = mesh_shape(cfg)
    if mem.zero_stage >= 2 and dp > 1:
        for key, value in (("model.expert_dim", m.expert_dim), ("model.dim", m.dim)):
            if value % dp:
                raise ConfigError(f"{key}={value} is not divisible by the data-parallel degree {dp} (cluster."
                                  f"num_devices={c.num_devices} / expert_parallel {mesh_shape(cfg)[0]}): at "
                                  f"memory.zero_stage={mem.zero_stage} each expert is split over the data-parallel "
                                  f"devices along model.expert_dim (w1, w3) and model.dim (w2), evenly (FSDP2 cannot "
                                  f"split dim 1 unevenly); choose a multiple of {dp}, another "
                                  f"parallel.expert_parallel, or memory.zero_stage=1")
    b = cfg.balance
    if dp > 1:
        for key, value in (("redundant_experts", b.redundant_experts), ("replace_every", b.replace_every),
                           ("replace_on_imbalance", b.replace_on_imbalance)):
            if value:
                raise ConfigError(f"balance.{key}={value} with data parallelism (cluster.num_devices={c.num_devices} "
                                  f"= expert_parallel {mesh_shape(cfg)[0]} x data parallel {dp}): expert "
                                  f"re-placement and replicas work on expert-parallel-only layouts; set "
                                  f"parallel.expert_parallel={c.num_devices} (with model.num_experts a multiple of "
                                  f"it), or remove balance.{key}")


def _validate_balance(cfg: Config) -> None:
    b, m = cfg.balance, cfg.model
    _positive(cfg, ["balance.aux_loss_coeff", "balance.seq_aux_loss_coeff", "balance.z_loss_coeff",
                    "balance.router_aux_loss_coeff", "balance.bias_update_speed", "balance.capacity_factor"],
              allow_zero=True)
    _positive(cfg, ["balance.num_groups", "balance.topk_groups", "balance.replace_window"])
    _positive(cfg, ["balance.replace_every", "balance.replace_min_gain", "balance.replace_on_imbalance"],
              allow_zero=True)
    _positive(cfg, ["balance.redundant_experts"], allow_zero=True)
    world = cfg.cluster.num_devices
    if b.redundant_experts and world == 1:
        raise ConfigError(f"balance.redundant_experts={b.redundant_experts} needs cluster.num_devices > 1: replicas "
                          f"spread an expert's tokens over devices")
    if b.redundant_experts % world:
        raise ConfigError(f"balance.redundant_experts={b.redundant_experts} is not a multiple of cluster.num_devices="
                          f"{world}: every device has the same number of expert slots")
    if b.redundant_experts and mesh_shape(cfg)[1] > 1:
        return  # refused by _validate_mesh, with the reason
    if expert_slots(cfg) > m.num_experts:
        raise ConfigError(f"balance.redundant_experts={b.redundant_experts} gives every device {expert_slots(cfg)} "
                          f"expert slots, more than model.num_experts={m.num_experts}: at most "
                          f"{m.num_experts * world - m.num_experts}")
    _choice("balance.routing", b.routing, ("topk", "grouped", "group_limited"))
    if b.routing == "topk":
        return
    if m.num_experts % b.num_groups:
        raise ConfigError(f"balance.num_groups={b.num_groups} does not divide model.num_experts={m.num_experts}; "
                          f"groups are equal runs of consecutive experts")
    per_group = m.num_experts // b.num_groups
    if b.routing == "grouped" and (m.top_k % b.num_groups or m.top_k // b.num_groups > per_group):
        raise ConfigError(f"balance.routing=grouped takes top_k/num_groups experts from each group: model.top_k="
                          f"{m.top_k} must be a multiple of balance.num_groups={b.num_groups}")
    if b.routing == "group_limited" and (b.topk_groups > b.num_groups or m.top_k > b.topk_groups * per_group):
        raise ConfigError(f"balance.routing=group_limited: balance.topk_groups={b.topk_groups} must be at most "
                          f"num_groups={b.num_groups} and hold at least model.top_k={m.top_k} experts "
                          f"({per_group} per group)")


# --------------------------------------------------------------------------- keys that would do nothing
def _show(value: Any) -> str:
    """A value as an override would spell it (repr for strings, as the other messages here)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def _default_of(cls: type, name: str) -> Any:
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


class _Keys:
    """Keys that have no effect under the chosen options, as validation finds them: one the user set (their config
    file or an override) is refused, every one of them in a single ConfigError; a default (the dataclasses', the
    default config file's) resolves to the value that applies, and says so. Either way the key takes its
    default value, so the checks after it do not trip over it."""

    def __init__(self, user: frozenset[str] | None):
        self.user = user              # None: every key counts as the user's (a Config built in code)
        self.refused: list[str] = []  # one message per key, each naming it and the fix
        self.resolved: list[str] = [] # `key=value -> default (why)`

    def by_user(self, key: str) -> bool:
        """Did the user set `key`, or a section or list holding it (`faults.plan` for `faults.plan[0].steps`)?"""
        return self.user is None or any(key == u or key.startswith((u + ".", u + "[")) for u in self.user)

    def check(self, obj: Any, name: str, key: str, default: Any, refusal: str, reason: str) -> None:
        """`obj.name` (dotted `key`) has no effect unless it equals `default`: refuse it with `refusal` if the
        user set it, else resolve it to `default` (`reason` says why, in the log)."""
        value = getattr(obj, name)
        if value == default:
            return
        if self.by_user(key):
            self.refused.append(refusal)
        else:
            self.resolved.append(f"{key}={_show(value)} -> {_show(default)} ({reason})")
        setattr(obj, name, default)

    def idle(self, obj: Any, name: str, key: str, why: str) -> None:
        """`obj.name` is read by nothing under the chosen options: `why` says so and what to do."""
        value = getattr(obj, name)
        self.check(obj, name, key, _default_of(type(obj), name), f"{key}={_show(value)} has no effect {why}",
                   f"no effect {_reason(why)}")

    def section(self, cfg: Config, section: str, names: tuple[str, ...], why: str) -> None:
        obj = cfg
        for part in section.split("."):
            obj = getattr(obj, part)
        for name in names:
            self.idle(obj, name, f"{section}.{name}", why)

    def raise_refused(self) -> None:
        if len(self.refused) == 1:
            raise ConfigError(self.refused[0])
        if self.refused:
            raise ConfigError(f"{len(self.refused)} keys have no effect under the chosen options: "
                              + " ".join(f"({i}) {r}" for i, r in enumerate(self.refused, 1)))


def _reason(why: str) -> str:
    """The reason part of an idle key's `why` ("with X (because): remove it, ..."): up to its first ': ' outside
    parentheses, where the fix starts."""
    depth = 0
    for i, ch in enumerate(why):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and why.startswith(": ", i):
            return why[:i]
    return why


def reads_token_files(d: DataConfig) -> bool:
    """Will data.path be read as uint16 token files (data.format, else a .bin file or a folder with train.bin)?
    orchestrator/data/corpus.py reads it so; the idle-key rules below ask the same."""
    if d.path is None:
        return False
    if d.format != "auto":
        return d.format == "bin"
    path = Path(d.path).expanduser()
    return path.suffix == ".bin" or (path.is_dir() and (path / "train.bin").is_file())


def _refuse_idle_keys(cfg: Config, keys: _Keys) -> None:
    """A key set to something other than its default where, under the chosen options, no code reads it is an
    error naming it: `balance.routing=topk balance.num_groups=3` would otherwise train plain top-k in silence.
    Each rule below mirrors the code that reads the key (named in the comment)."""
    m, d, b, c, mon = cfg.model, cfg.data, cfg.balance, cfg.cluster, cfg.monitor
    # model/transformer.py: dense layers only below first_k_dense; model/moe.py Router: renormalises k > 1 gates
    if m.first_k_dense == 0:
        keys.section(cfg, "model", ("dense_dim",), "with model.first_k_dense=0 (no dense layers): remove it, or "
                                                   "set model.first_k_dense")
    if m.top_k == 1:
        keys.section(cfg, "model", ("norm_topk_prob",), "with model.top_k=1 (a single gate is never "
                                                        "renormalised): remove it")
    # data/corpus.py: the embedded corpus is text; token files are read whole, and a val.bin beside train.bin
    # is the validation split
    if d.path is None:  # (format=bin without a path is refused above)
        keys.section(cfg, "data", ("format",), "without data.path (the embedded corpus is text already): remove "
                                               "it, or set data.path")
    elif reads_token_files(d):
        keys.section(cfg, "data", ("max_bytes",), f"on token files (data.path={d.path!r} is read as uint16 "
                                                  f"tokens, whole): remove it")
        if Path(d.path).expanduser().is_dir() and (Path(d.path).expanduser() / "val.bin").is_file():
            keys.section(cfg, "data", ("val_fraction",), f"with a val.bin in data.path={d.path!r} (it is the "
                                                         f"validation split): remove it")
    # model/balancing.py select_experts: topk reads neither group key, grouped not topk_groups
    if b.routing == "topk":
        keys.section(cfg, "balance", ("num_groups", "topk_groups"),
                     "with balance.routing='topk' (only the grouped and group_limited routings read it): remove "
                     "it, or set balance.routing=grouped or group_limited")
    elif b.routing == "grouped":
        keys.section(cfg, "balance", ("topk_groups",),
                     "with balance.routing='grouped' (every token takes top_k/num_groups experts from every "
                     "group; only group_limited reads it): remove it, or set balance.routing=group_limited")
    # balancer.py Balancer.due/plan: one device never re-plans; without replace_every or replace_on_imbalance no
    # plan is ever made (redundant_experts alone keeps the initial placement and its replicas)
    if c.num_devices == 1:
        keys.section(cfg, "balance", ("replace_every", "replace_on_imbalance"),
                     "with cluster.num_devices=1 (re-placement moves experts between devices): remove it, or use "
                     "more devices")
    if not b.replace_every and not b.replace_on_imbalance:
        keys.section(cfg, "balance", ("replace_window", "replace_min_gain"),
                     "while live re-placement is off (balance.replace_every=0 and balance.replace_on_imbalance=0): "
                     "set one of them, or remove it")
    # device/group.py: the GPU share of a bundle is asked for only with use_gpu
    if not c.use_gpu:
        keys.section(cfg, "cluster", ("gpus_per_device",), "with cluster.use_gpu=false: set cluster.use_gpu=true, "
                                                           "or remove it")
        keys.section(cfg, "memory", ("offload_optimizer",), "with cluster.use_gpu=false (optimizer states are in "
                                                            "host memory already): remove it, or run on GPUs")
    # parallel/sharding.py, parallel/mesh.py: one device has nothing to shard its state over or split experts across
    if c.num_devices == 1:
        keys.section(cfg, "memory", ("zero_stage",), "with cluster.num_devices=1 (ZeRO shards state over several "
                                                     "devices): remove it, or use more devices")
        keys.section(cfg, "parallel", ("expert_parallel",), "with cluster.num_devices=1: remove it")
    # parallel/sharding.py: optimizer offload moves states that ZeRO stage >= 1 shards (FSDP2's CPUOffloadPolicy)
    if cfg.memory.zero_stage < 2:
        keys.section(cfg, "memory", ("offload_optimizer",), "with memory.zero_stage below 2 (offload follows FSDP2's "
                                                            "sharded state): set memory.zero_stage=2 or 3, or remove it")
    _refuse_idle_checkpoint_keys(cfg, keys)
    _refuse_idle_fault_keys(cfg, keys)
    # metrics.py TensorBoardSink: histograms go to TensorBoard only; alerts.py: the webhook and its settings
    if not mon.tensorboard:
        keys.section(cfg, "monitor", ("histogram_every",), "with monitor.tensorboard=false (histograms go to "
                                                           "TensorBoard only): remove it, or set monitor.tensorboard=true")
    if not mon.webhook_url:
        keys.section(cfg, "monitor", ("webhook_timeout_s", "webhook_retries"),
                     "without monitor.webhook_url: set monitor.webhook_url, or remove it")
    elif all(a.action == "record" for a in mon.alerts):
        keys.check(mon, "webhook_url", "monitor.webhook_url", None,
                   "monitor.webhook_url has no effect: every rule of monitor.alerts has action=record, and only "
                   "alerts whose action is notify, rollback, skip or stop are posted; give a rule action=notify, or "
                   "remove monitor.webhook_url", "every rule of monitor.alerts has action=record")
    for i, a in enumerate(mon.alerts):  # alerts.py measure: which rules read threshold and window
        if a.rule == "nonfinite":
            keys.idle(a, "threshold", f"monitor.alerts[{i}].threshold", "on the nonfinite rule (any non-finite "
                                                                        "loss or gradient norm fires it): remove it")
        if a.rule == "restore_failed":
            keys.idle(a, "threshold", f"monitor.alerts[{i}].threshold", "on the restore_failed rule (any state "
                                                                        "recovery cannot restore fires it): remove it")
        if a.rule == "checkpoint_failed":
            keys.idle(a, "threshold", f"monitor.alerts[{i}].threshold", "on the checkpoint_failed rule (every "
                                                                        "failed checkpoint fires it): remove it")
            keys.idle(a, "steps", f"monitor.alerts[{i}].steps", "on the checkpoint_failed rule (every failed "
                                                                "checkpoint fires it): remove it")
        if a.rule not in ("loss_spike", "grad_spike", "throughput_drop", "restarts"):
            keys.idle(a, "window", f"monitor.alerts[{i}].window",
                      f"on the {a.rule} rule (only loss_spike, grad_spike, throughput_drop and restarts look back "
                      f"over a window): remove it")


def _refuse_idle_checkpoint_keys(cfg: Config, keys: _Keys) -> None:
    ck, f = cfg.checkpoint, cfg.faults
    # checkpoint/manager.py retention: keep_last=0 keeps every checkpoint already
    if ck.keep_last == 0:
        keys.section(cfg, "checkpoint", ("keep_every",), "with checkpoint.keep_last=0 (every checkpoint is kept): "
                                                         "remove it, or set checkpoint.keep_last")
    # driver.py after_step/run: a save happens by the policy, on a signal, at the end, or for a checkpoint fault
    faults = [s.kind for s in f.plan] + (list(f.chaos.kinds) if f.chaos.mean_steps_between else [])
    if not (ck.every_steps or ck.at_end or ck.on_signal or "checkpoint" in faults):
        keys.section(cfg, "checkpoint", ("keep_last", "keep_every", "async_save"),
                     "in a run that never saves a checkpoint (checkpoint.every_steps=0, at_end=false, "
                     "on_signal=false): turn a save on, or remove it")


def _refuse_idle_fault_keys(cfg: Config, keys: _Keys) -> None:
    f, ch = cfg.faults, cfg.faults.chaos
    # healing.py Injector: a step wins over after_s; DeviceActor.inject: steps/delay_s for slow, in_collective for hang
    for i, spec in enumerate(f.plan):
        key = f"faults.plan[{i}]"
        if spec.step:
            keys.idle(spec, "after_s", f"{key}.after_s", f"(the fault strikes in its step={spec.step}): give "
                                                          f"either step or after_s")
        if spec.kind != "slow":
            for name in ("steps", "delay_s"):
                keys.idle(spec, name, f"{key}.{name}",
                          f"on a {spec.kind} fault (only slow faults read steps and delay_s): remove it")
        if spec.kind != "hang":
            keys.idle(spec, "in_collective", f"{key}.in_collective",
                      f"on a {spec.kind} fault (only hang faults read it): remove it")
    # healing.py plan_faults: the chaos keys make random faults; the seed also draws the device of rank -1 faults
    if not ch.mean_steps_between:
        keys.section(cfg, "faults.chaos", ("kinds", "first_step", "slow_steps", "slow_delay_s"),
                     "while random chaos is off (faults.chaos.mean_steps_between=0): set "
                     "faults.chaos.mean_steps_between (jobs.chaos: --every N), or remove it")
        if all(s.rank != -1 for s in f.plan):
            keys.section(cfg, "faults.chaos", ("seed",),
                         "while random chaos is off (faults.chaos.mean_steps_between=0) and no planned fault has "
                         "rank -1 (a random device): set faults.chaos.mean_steps_between (jobs.chaos: --every N), "
                         "or remove it")
    elif "slow" not in ch.kinds:
        keys.section(cfg, "faults.chaos", ("slow_steps", "slow_delay_s"),
                     "while faults.chaos.kinds has no slow: add slow to faults.chaos.kinds, or remove it")
    # healing.py Watch._stragglers: compares a device with the others
    if cfg.cluster.num_devices == 1:
        keys.section(cfg, "faults", ("straggler_factor", "straggler_min_s", "straggler_patience", "on_straggler"),
                     "with cluster.num_devices=1 (a straggler is a device slower than the others): remove it, or "
                     "use more devices")
    # healing.py Healer._spend: with snapshots off the first failure stops the run before any of these is read
    if f.snapshot_every == 0:
        keys.section(cfg, "faults", ("standby", "max_recoveries", "recovery_window_s", "max_repeats",
                                     "recovery_attempts", "retry_backoff_s", "recovery_timeout_s"),
                     "with faults.snapshot_every=0 (healing off: the first failure stops the run): set "
                     "faults.snapshot_every to 1 (or more), or remove it")


# --------------------------------------------------------------------------- secrets
REDACTED = "***"
# Query parameters whose values are credentials: S3's access_key/secret_key/session_token, presigned URLs'
# X-Amz-Signature/X-Amz-Credential, Azure SAS sig, OAuth access_token, api keys, passwords.
_SECRET_PARAM = re.compile(r"token|key|secret|pass|pwd|sig|auth|credential|session|cookie|private", re.IGNORECASE)
_SECRET_URLS = ("monitor.webhook_url",)   # the whole URL is the credential (Slack, PagerDuty keys in the path)


def redact_url(url: str, keep_path: bool = True) -> str:
    """`url` safe to write or log: user info (`s3://KEY:SECRET@bucket`, `https://user:pass@host`) and the values of
    credential-looking query parameters (`?token=...`) become ***, a fragment goes; with keep_path=False the path
    and query too (a webhook URL, whose path is its key). A string that is not a URL comes back unchanged.

    Parsed by hand, not with urllib: a secret written unencoded may hold '/', which would end urllib's netloc
    early and leave the rest of the secret in the path; here everything up to the last '@' before the query goes."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    body, qsep, query = rest.partition("#")[0].partition("?")
    if "@" in body:
        body = REDACTED + "@" + body.rsplit("@", 1)[1]
    if not keep_path:
        host = body.split("/", 1)[0]
        return f"{scheme}://{host}" + (f"/{REDACTED}" if body[len(host):].strip("/") or query else "")
    items = []
    for item in query.split("&") if query else []:
        name, eq, _ = item.partition("=")
        items.append(f"{name}={REDACTED}" if eq and _SECRET_PARAM.search(name) else item)
    return f"{scheme}://{body}" + (qsep + "&".join(items) if qsep else "")


def redacted(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    """The config as a plain dict with its secrets redacted: what config.yaml, the report, MLflow params and logs
    get. Every string that is a URL loses its credentials (redact_url); monitor.webhook_url keeps only its host."""

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if isinstance(value, str):
            return redact_url(value, keep_path=key not in _SECRET_URLS)
        return value

    return walk(to_dict(cfg) if isinstance(cfg, Config) else cfg, "")


def redacted_yaml(cfg: Config | dict[str, Any]) -> str:
    """The resolved config as YAML, secrets redacted (a run directory's config.yaml)."""
    return OmegaConf.to_yaml(OmegaConf.create(redacted(cfg)))


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_text(text: str) -> str:
    """Free text (an error message, a log line, a YAML file that does not parse) with every URL in it redacted."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def _validate_run(cfg: Config) -> None:
    """run.id, train.lr_horizon, train.resume_accept_changes."""
    import re

    rid = cfg.run.id
    if rid is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", rid):
        raise ConfigError(f"run.id={rid!r} must be letters, digits, '.', '_' or '-' (it names the run's checkpoint "
                          f"folder under checkpoint.dir)")
    if cfg.train.lr_horizon is not None and cfg.train.lr_horizon < 1:
        raise ConfigError(f"train.lr_horizon={cfg.train.lr_horizon} must be 1 or more (or null: train.steps)")
    for key in cfg.train.resume_accept_changes:
        if key not in RESUME_EXACT_KEYS:
            raise ConfigError(f"train.resume_accept_changes: {key!r} is not a setting a resume refuses to change; "
                              f"those are {', '.join(RESUME_EXACT_KEYS)} (others change with a warning)")
    if cfg.train.resume_accept_changes and not cfg.train.resume:
        raise ConfigError("train.resume_accept_changes is set but train.resume is not: it only affects a resume")
    for i, pattern in enumerate(cfg.train.freeze):   # whether each names a parameter: planner.frozen_names
        if not pattern.strip():
            raise ConfigError(f"train.freeze[{i}] is empty: give a parameter name or an fnmatch pattern such as "
                              f"'*.router.*'")
