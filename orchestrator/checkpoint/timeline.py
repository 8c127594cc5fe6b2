"""Runs and timelines: which checkpoints are a run's, what `latest` means, what a resume may change.

A run has an id (`run.id`; else the one its run directory records in run.json; else a new one). Its
checkpoints live in its own folder: <run dir>/checkpoints, or <checkpoint.dir>/<run id> when
`checkpoint.dir` names a root that several runs share (as Ray Train keeps <storage_path>/<name>).
Every manifest names its run and the checkpoint it descends from (`parent`). A run folder holds one
live timeline: a run that continues from step k (a resume, or a fresh start at 0 in a reused run
directory) first retires the checkpoints after k, moving them to <folder>/retired/<time>-after-<k>/,
so `latest` is the newest checkpoint of the live timeline, and retention and commits never meet a
checkpoint of another timeline or another run. The run directory's logs follow the same rule
(orchestrator.monitoring.rundir.rewind_logs).

`plan_resume` decides all of this before anything starts (no Ray, no torch): a checkpoint beyond
train.steps is a config error, one at train.steps means there is nothing to do, and settings whose
change breaks exact continuation are refused unless `train.resume_accept_changes` names them.
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator.checkpoint.manager import CheckpointManifest, check_compatible, find_resume, list_checkpoints, step_dir
from orchestrator.config import RESUME_EXACT_KEYS, Config, ConfigError, to_dict
from orchestrator.monitoring.rundir import write_atomic
from orchestrator.device.schedule import lr_at
from orchestrator.checkpoint.storage import Storage, StorageError, uri_join

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
RETIRED = "retired"
# train.* settings a resume compares with the checkpoint (a change is allowed with a warning); train.steps,
# eval and resume keys are free to change, the model and dtype must match (check_compatible).
_TRAIN_KEYS = ("global_batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2",
               "grad_clip", "mixed_precision", "freeze")
_DATA_KEYS = ("path", "format", "seq_len", "val_fraction", "max_bytes", "tokenizer", "train_tokenizer", "task", "pack",
              "max_samples")


def new_run_id(name: str) -> str:
    return f"{name}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def recorded_run_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def run_id_of(cfg: Config, run_dir: Path) -> str:
    """The run's id: `run.id`, else the one the run directory records (run.json), else a new one. Decided once per
    run, with the run directory held (orchestrator.runtime.runlock.hold_run), and handed to `plan_resume`."""
    return cfg.run.id or recorded_run_id(run_dir) or new_run_id(cfg.run.name)


def record_run_id(run_dir: Path, run_id: str) -> None:
    path = run_dir / RUN_FILE
    if recorded_run_id(run_dir) != run_id:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"run_id": run_id, "created": time.time()}) + "\n")


def run_folder(cfg: Config, run_dir: Path, run_id: str) -> str:
    """The run's checkpoint folder (a path or URI)."""
    return uri_join(cfg.checkpoint.dir, run_id) if cfg.checkpoint.dir else str(run_dir / "checkpoints")


def training_settings(cfg: Config) -> dict[str, Any]:
    """What exact continuation depends on besides the model (saved in every manifest)."""
    d = to_dict(cfg)
    return {"seed": cfg.seed, "data": {k: d["data"][k] for k in _DATA_KEYS},
            "train": {k: d["train"][k] for k in _TRAIN_KEYS}, "balance": d["balance"]}


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    out = {"seed": settings.get("seed")}
    for section in ("data", "train", "balance"):
        out.update({f"{section}.{k}": v for k, v in (settings.get(section) or {}).items()})
    return out


def continuation_changes(manifest: CheckpointManifest, cfg: Config, where: str) -> list[str]:
    """Settings this run changes from the checkpoint: a ConfigError for those that break exact continuation
    (RESUME_EXACT_KEYS) unless train.resume_accept_changes names them; the warnings for the others."""
    if manifest.training is None:
        return [f"{where} predates saved training settings: seed, data and optimizer settings cannot be compared"]
    saved, now = _flat(manifest.training), _flat(training_settings(cfg))
    changed = [(k, saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]]
    accepted = set(cfg.train.resume_accept_changes)
    refused = [(k, a, b) for k, a, b in changed if k in RESUME_EXACT_KEYS and k not in accepted]
    if refused:
        listing = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in refused)
        keys = ", ".join(k for k, _, _ in refused)
        raise ConfigError(f"train.resume from {where}: {listing}. A resume with a different {keys} does not continue "
                          f"the run (each step's batch depends on them): resume with the checkpoint's values, or "
                          f"accept the change with train.resume_accept_changes=[{keys}]")
    return [f"{k} changed on resume: checkpoint {a!r}, this run {b!r} (the run does not continue exactly"
            f"{'; accepted by train.resume_accept_changes' if k in accepted else ''})" for k, a, b in changed]


@dataclass
class ResumePlan:
    """Where a run starts, decided before anything starts."""
    run_id: str
    folder: str                                   # the run's checkpoint folder
    storage: Storage | None = None                # the checkpoint resumed from (None: step 0)
    manifest: CheckpointManifest | None = None
    retire: list[int] = field(default_factory=list)  # this run's committed checkpoints on the abandoned timeline
    lr_horizon: int = 0
    logs_through: int = 0                         # the run directory's logs are kept up to this step
    complete: bool = False                        # the checkpoint is at train.steps: nothing to do
    warnings: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return self.manifest.step if self.manifest else 0

    @property
    def parent(self) -> dict[str, Any] | None:
        return {"run_id": self.manifest.run_id, "step": self.manifest.step} if self.manifest else None


def plan_resume(cfg: Config, run_dir: Path, run_id: str | None = None) -> ResumePlan:
    """The run's id (`run_id`, else `run_id_of`) and folder, the checkpoint it continues from, the checkpoints it
    retires, the LR horizon. Raises ConfigError (train.steps below the checkpoint; a setting whose change breaks
    continuation) and CheckpointError (nothing to resume at an explicit path; a different model)."""
    run_id = run_id or run_id_of(cfg, run_dir)
    folder = run_folder(cfg, run_dir, run_id)
    plan = ResumePlan(run_id, folder, lr_horizon=cfg.train.lr_horizon or cfg.train.steps)
    if cfg.train.resume:
        found = find_resume(cfg.train.resume, folder)
        if found is None:
            others = _other_runs(cfg, run_id)
            log.info("train.resume=latest: no checkpoint of run %s under %s yet; starting at step 1%s", run_id,
                     Storage(folder).shown,
                     f" (checkpoint.dir holds runs {', '.join(others)}: to continue one, set run.id)" if others else "")
        else:
            plan.storage, plan.manifest = found
    m = plan.manifest
    if m is not None:
        where = plan.storage.shown
        check_compatible(m, cfg, where)
        if m.step > cfg.train.steps:
            raise ConfigError(f"train.steps={cfg.train.steps} is below step {m.step} of the checkpoint resumed from "
                              f"({where}): a resume continues a run; set train.steps above {m.step}, or resume from "
                              f"an earlier checkpoint")
        plan.complete = m.step == cfg.train.steps
        plan.warnings = continuation_changes(m, cfg, where)
        plan.lr_horizon = _horizon(cfg, m, plan.warnings)
    try:
        mine = list_checkpoints(Storage(folder))
    except StorageError:
        if cfg.train.resume:
            raise
        mine = []  # a fresh start: the driver's storage check says what is wrong with checkpoint.dir
    resumed = [s for s, st in mine if m is not None and _same_place(st, plan.storage)]
    same_run = m is not None and (m.run_id == run_id or bool(resumed))
    # a run continuing its own timeline after step k retires its checkpoints after k; a run continuing from
    # another run's checkpoint (or starting over) retires all of its own, never the one it resumes from
    plan.retire = [s for s, _ in mine if (s > plan.step or not same_run) and s not in resumed]
    plan.logs_through = plan.step if same_run else 0
    if m is None and cfg.train.resume == "latest" and cfg.checkpoint.dir:
        _refuse_the_old_layout(cfg.checkpoint.dir)
    return plan


def _same_place(a: Storage, b: Storage) -> bool:
    """Two storages at one place (local paths resolved, URIs without their query)."""
    return type(a.fs) is type(b.fs) and a.root.rstrip("/") == b.root.rstrip("/")


def _refuse_the_old_layout(root: str) -> None:
    """Checkpoints written before runs had ids sit right under checkpoint.dir: `latest` does not look there (it
    looks in <checkpoint.dir>/<run id>); starting over silently would throw that run away."""
    try:
        old = list_checkpoints(Storage(root))
    except StorageError:
        return
    if old:
        raise ConfigError(f"train.resume=latest: checkpoint.dir={Storage(root).shown} holds checkpoints directly "
                          f"(steps {', '.join(str(s) for s, _ in old[-3:])}), as runs wrote them before run ids: "
                          f"resume one by its path, train.resume={old[-1][1].shown}; later checkpoints then go to "
                          f"<checkpoint.dir>/<run id>/")


def _horizon(cfg: Config, m: CheckpointManifest, warnings: list[str]) -> int:
    t, nxt = cfg.train, m.step + 1
    saved = m.lr_horizon
    if t.lr_horizon is None:
        if saved is not None:
            return saved
        warnings.append(f"the checkpoint of step {m.step} predates saved LR schedules: its horizon is taken as "
                        f"train.steps={t.steps} (set train.lr_horizon to the run's original train.steps to keep it)")
        return t.steps
    if saved is not None and saved != t.lr_horizon:
        before = lr_at(nxt, t.lr, t.warmup_steps, saved, t.min_lr_ratio)
        after = lr_at(nxt, t.lr, t.warmup_steps, t.lr_horizon, t.min_lr_ratio)
        log.info("train.lr_horizon=%d replaces the checkpoint's %d: LR at step %d %.3e -> %.3e", t.lr_horizon, saved,
                 nxt, before, after)
    return t.lr_horizon


def _other_runs(cfg: Config, run_id: str) -> list[str]:
    if not cfg.checkpoint.dir:
        return []
    try:
        return [name for name in Storage(cfg.checkpoint.dir).list_dirs() if name != run_id][:5]
    except Exception:
        return []


def retire(folder: Storage, steps: list[int], after: int) -> str | None:
    """Move the checkpoints of `steps` aside (the timeline a run continuing after step `after` abandons); where."""
    if not steps:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = f"{RETIRED}/{stamp}-after-{after}"
    for step in steps:
        folder.move_dir(step_dir(step), f"{dest}/{step_dir(step)}")
    where = uri_join(folder.shown, dest)
    log.warning("run continues after step %d: checkpoint(s) %s of the timeline it abandons moved to %s (never "
                "loaded by train.resume=latest; delete them, or resume one by its path)",
                after, ", ".join(map(str, steps)), where)
    return where


__all__ = ["ResumePlan", "plan_resume", "retire", "run_folder", "training_settings", "record_run_id",
           "recorded_run_id", "run_id_of", "RUN_FILE", "RETIRED"]
