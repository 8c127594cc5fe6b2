"""Keys that have no effect under the chosen options: refused when the user set them, resolved (and said once)
when they are defaults. Each rule mirrors the code that reads the key (named in its comment)."""
from __future__ import annotations

from pathlib import Path

from orchestrator.config.balance import anticipates
from orchestrator.config.base import _Keys
from orchestrator.config.data import reads_token_files
from orchestrator.config.faults import FaultKind
from orchestrator.config.mesh import effective_zero_stage

from orchestrator.config.schema import Config


def _refuse_idle_keys(cfg: Config, keys: _Keys) -> None:
    """A key set to something other than its default where, under the chosen options, no code reads it is an
    error naming it: `balance.routing=topk balance.num_groups=3` would otherwise train plain top-k in silence.
    Each rule below mirrors the code that reads the key (named in the comment)."""
    _refuse_idle_model_data_keys(cfg, keys)
    _refuse_idle_layout_keys(cfg, keys)
    _refuse_idle_checkpoint_keys(cfg, keys)
    _refuse_idle_fault_keys(cfg, keys)
    _refuse_idle_monitor_keys(cfg, keys)
    _refuse_idle_rl_keys(cfg, keys)


def _refuse_idle_rl_keys(cfg: Config, keys: _Keys) -> None:
    """device/rl.py and rl/: the rl section is read with data.task=rl only; data keys an RL run does not read."""
    r = cfg.rl
    if cfg.data.task != "rl":
        keys.section(cfg, "rl", tuple(n for n in vars(r) if n != "rollout"),
                     "without data.task=rl (the rl section shapes RL post-training): set data.task=rl, or remove it")
        keys.section(cfg, "rl.rollout", tuple(vars(r.rollout)), "without data.task=rl: set data.task=rl, or remove it")
        return
    keys.section(cfg, "data", ("path", "format", "max_bytes", "val_fraction", "pack", "max_samples"),
                 "with data.task=rl (the prompts come from rl.task): remove it")
    for name in ("eval_batches", "eval_every"):   # no validation loss: held-out accuracy instead (rl.eval_problems)
        keys.check(cfg.train, name, f"train.{name}", 0, f"train.{name}={getattr(cfg.train, name)} has no effect with "
                   f"data.task=rl (held-out accuracy is measured instead: rl.eval_problems): remove it",
                   "data.task=rl measures held-out accuracy instead")
    if r.task != "arithmetic":
        keys.section(cfg, "rl", ("task_digits", "task_ops"), f"with rl.task={r.task!r} (they shape the arithmetic "
                                                             f"task): remove it")
    if r.rollout.workers == 0:
        keys.section(cfg, "rl.rollout", ("cpus_per_worker", "gpus_per_worker"),
                     "with rl.rollout.workers=0 (colocated: the device actors generate): remove it, or set "
                     "rl.rollout.workers")


def _refuse_idle_model_data_keys(cfg: Config, keys: _Keys) -> None:
    m, d = cfg.model, cfg.data
    # model/transformer.py: dense layers only below first_k_dense; model/moe.py Router: renormalises k > 1 gates
    if m.first_k_dense == 0:
        keys.section(cfg, "model", ("dense_dim",), "with model.first_k_dense=0 (no dense layers): remove it, or "
                                                   "set model.first_k_dense")
    if m.mtp_depth == 0:   # model/mtp.py: no MTP module, no MTP loss
        keys.section(cfg, "model", ("mtp_weight",), "with model.mtp_depth=0 (no multi-token prediction): remove it, "
                                                    "or set model.mtp_depth")
    if m.top_k == 1:
        keys.section(cfg, "model", ("norm_topk_prob",), "with model.top_k=1 (a single gate is never "
                                                        "renormalised): remove it")
    # model/moe.py: only the MoE layers' experts clamp their SwiGLU
    if m.first_k_dense >= m.n_layers:   # (the MTP blocks are dense too then)
        keys.section(cfg, "model", ("swiglu_limit",), "with model.first_k_dense=model.n_layers (no MoE layer: only "
                                                      "experts clamp their SwiGLU): remove it")
    # model/transformer.py Block (the output norms) and init_weights (which std each init reads)
    if m.norm == "pre":
        keys.section(cfg, "model", ("sandwich_attn_scale", "sandwich_ffn_scale"),
                     "with model.norm='pre' (only the sandwich norm's output norms read it): remove it, or set "
                     "model.norm=sandwich")
    if m.init == "gpt2":
        keys.section(cfg, "model", ("tiny_init_embed_std",), "with model.init='gpt2' (only TinyInit reads it): "
                                                             "remove it, or set model.init=tiny")
    else:
        keys.section(cfg, "model", ("init_std",), "with model.init='tiny' (TinyInit's std comes from model.dim and "
                                                  "model.n_layers): remove it, or set model.init=gpt2")
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


def _refuse_idle_layout_keys(cfg: Config, keys: _Keys) -> None:
    """Routing, re-placement, the mesh, ZeRO and offload: what the devices and their number make idle."""
    b, c = cfg.balance, cfg.cluster
    # model/balancing.py select_experts: topk reads neither group key, grouped not topk_groups
    if b.routing == "topk":
        keys.section(cfg, "balance", ("num_groups", "topk_groups"),
                     "with balance.routing='topk' (only the grouped and group_limited routings read it): remove "
                     "it, or set balance.routing=grouped or group_limited")
    elif b.routing == "grouped":
        keys.section(cfg, "balance", ("topk_groups",),
                     "with balance.routing='grouped' (every token takes top_k/num_groups experts from every "
                     "group; only group_limited reads it): remove it, or set balance.routing=group_limited")
    # model/moe.py balance_losses: the scope is of the Switch loss only
    if not b.aux_loss_coeff:
        keys.section(cfg, "balance", ("aux_loss_scope",), "with balance.aux_loss_coeff=0 (it is that loss's scope): "
                                                          "set balance.aux_loss_coeff, or remove it")
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
    # device/anticipate.py: read only when anticipatory routing can happen; the calm steps only after an alert
    if not anticipates(cfg):
        keys.section(cfg, "balance", ("anticipatory_delay",),
                     "while anticipatory routing is off (balance.anticipatory_routing=false and no alert rule with "
                     "action=anticipate): turn it on, or remove it")
    if not any(a.action == "anticipate" for a in cfg.monitor.alerts):
        keys.section(cfg, "balance", ("anticipatory_calm_steps",),
                     "without an alert rule with action=anticipate (it says how long that action's anticipatory "
                     "routing lasts): add one, or remove it")
    # device/group.py: the GPU share of a bundle is asked for only with use_gpu
    if not c.use_gpu:
        keys.section(cfg, "cluster", ("gpus_per_device",), "with cluster.use_gpu=false: set cluster.use_gpu=true, "
                                                           "or remove it")
        keys.section(cfg, "memory", ("offload_optimizer",), "with cluster.use_gpu=false (optimizer states are in "
                                                            "host memory already): remove it, or run on GPUs")
    # parallel/sharding.py, parallel/mesh.py: one device has nothing to shard its state over or split experts across
    if effective_zero_stage(cfg) != cfg.memory.zero_stage:   # one device: stage 0 whatever the key says
        keys.section(cfg, "memory", ("zero_stage",), "with cluster.num_devices=1 (ZeRO shards state over several "
                                                     "devices): remove it, or use more devices")
    if c.num_devices == 1:
        keys.section(cfg, "parallel", ("expert_parallel",), "with cluster.num_devices=1: remove it")
    # parallel/sharding.py: optimizer offload moves states that ZeRO stage >= 1 shards (FSDP2's CPUOffloadPolicy)
    if cfg.memory.zero_stage < 2:
        keys.section(cfg, "memory", ("offload_optimizer",), "with memory.zero_stage below 2 (offload follows FSDP2's "
                                                            "sharded state): set memory.zero_stage=2 or 3, or remove it")


def _refuse_idle_monitor_keys(cfg: Config, keys: _Keys) -> None:
    mon = cfg.monitor
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
    if not (ck.every_steps or ck.at_end or ck.on_signal or FaultKind.CHECKPOINT in faults):
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
        if spec.kind != FaultKind.SLOW:
            for name in ("steps", "delay_s"):
                keys.idle(spec, name, f"{key}.{name}",
                          f"on a {spec.kind} fault (only slow faults read steps and delay_s): remove it")
        if spec.kind != FaultKind.HANG:
            keys.idle(spec, "in_collective", f"{key}.in_collective",
                      f"on a {spec.kind} fault (only hang faults read it): remove it")
    # healing.py plan_faults: the chaos keys make random faults; the seed also draws the device of rank -1 faults
    if not ch.mean_steps_between:
        keys.section(cfg, "faults.chaos", ("kinds", "first_step", "slow_steps", "slow_delay_s", "rollout_share"),
                     "while random chaos is off (faults.chaos.mean_steps_between=0): set "
                     "faults.chaos.mean_steps_between (jobs.chaos: --every N), or remove it")
        if all(s.rank != -1 for s in f.plan):
            keys.section(cfg, "faults.chaos", ("seed",),
                         "while random chaos is off (faults.chaos.mean_steps_between=0) and no planned fault has "
                         "rank -1 (a random device): set faults.chaos.mean_steps_between (jobs.chaos: --every N), "
                         "or remove it")
    else:
        if FaultKind.SLOW not in ch.kinds:
            keys.section(cfg, "faults.chaos", ("slow_steps", "slow_delay_s"),
                         "while faults.chaos.kinds has no slow: add slow to faults.chaos.kinds, or remove it")
        if cfg.data.task != "rl" or FaultKind.KILL not in ch.kinds:
            keys.section(cfg, "faults.chaos", ("rollout_share",),
                         "without rollout workers to kill (it needs data.task=rl and kill in faults.chaos.kinds): "
                         "remove it")
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
