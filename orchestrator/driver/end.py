"""The end of a run, whatever ended it (Driver._run calls end_work once its loop is over or broke off): a
checklist over the run's services, each part done as far as it can, and the run's results (summary.json,
goodput.json, report.html). It works with a RunEnd: the run's services, not the Driver (which imports this
module)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from orchestrator.errors import RunError
from orchestrator.monitoring.rundir import FIX
from orchestrator.monitoring.summary import RunSummary, write_results
from orchestrator.runtime import signals
from orchestrator.runtime.disk import DiskFull, full

if TYPE_CHECKING:
    from orchestrator.checkpoint.coordinator import Checkpoints
    from orchestrator.checkpoint.events import CheckpointEvents
    from orchestrator.config import Config
    from orchestrator.device.group import DeviceGroup
    from orchestrator.healing import Healer, Injector
    from orchestrator.healing.recovery import Recovery
    from orchestrator.monitoring.goodput import Goodput
    from orchestrator.monitoring.history import RunHistory
    from orchestrator.monitoring.listeners import Listeners
    from orchestrator.monitoring.status import StatusFile

log = logging.getLogger(__name__)


@dataclass
class RunEnd:
    """What the end of a run works with, as it stands once the loop is over or broke off (Driver.run_end)."""
    cfg: Config
    run_dir: Path
    history: RunHistory
    checkpoints: Checkpoints
    events: CheckpointEvents       # the checkpoints in flight completed, as events to the listeners
    devices: DeviceGroup
    healer: Healer
    listeners: Listeners
    injector: Injector
    recovery: Recovery
    goodput: Goodput
    status: StatusFile
    write_status: Callable[[str, str | None], None]   # status.json with this state and reason
    metrics: Any | None            # MetricsStream, Progress, AlertEngine: None before stepping began
    progress: Any | None
    alerts: Any | None
    t_loop: float | None           # when stepping began
    stop_signal: str | None
    val_loss: float | None
    rl: Any | None = None          # RL post-training's service (rl/service.py): its rollout pool, held-out accuracy


def end_work(d: RunEnd, state: str, reason: str | None, interrupted, t_start: float):
    """What every run does at its end, whatever ended it, each part as far as it can: incidents published,
    the checkpoints in flight committed (a failed run's waited for, an interrupted run's if written already;
    only those whose step's record is written), status.json, the devices released, saves left unfinished
    removed, the sinks closed, webhooks delivered, summary.json, goodput.json and report.html. A second signal
    during it (the first one when every step had finished) makes the run interrupted, and the end work goes on
    (status.json and summary.json say so); an error in one part (a full disk) is logged and the next part done.
    Returns (state, interrupted, summary)."""
    if d.t_loop is not None and not d.goodput.wall:  # stepping did not get to its end: close the books now
        d.goodput.finish(time.perf_counter() - d.t_loop)
    summary = None

    def part(what: str, fn) -> None:
        nonlocal state, interrupted
        try:
            fn()
        except KeyboardInterrupt as e:
            interrupted, state = signals.interrupted(e), "interrupted"
        except Exception as e:  # a full disk must not hide the run's own error or leave actors behind
            log.warning("%s: %s", what, e)

    def why() -> str | None:
        if state == "interrupted" and interrupted is not None:
            return f"{interrupted.describe()}: interrupted after step {d.history.last_kept}"
        return reason

    def results(report: bool) -> None:
        nonlocal summary
        summary = summarize(d, time.perf_counter() - t_start, interrupted, state, why(), report)

    part("could not publish the incidents", lambda: d.listeners.incidents(d.healer.take_new()))
    if d.checkpoints.pending and d.devices.actors:  # the outcomes told, not judged: the run is over
        if state == "failed":
            part("could not settle the checkpoints in flight", lambda: _settle_before_shutdown(d))
        else:  # interrupted: no waiting, but what is written already commits
            part("could not commit the checkpoints written", lambda: d.events.poll(
                d.devices.actors, commit_through=d.history.recorded_through).raise_error())
    told = state
    part("could not write status.json", lambda: d.write_status(told, why()))
    part("could not release the devices", d.devices.shutdown)
    if d.rl is not None:
        part("could not release the rollout workers", d.rl.shutdown)
    if d.checkpoints.pending:  # an interrupted run's saves: their writers are gone with the devices
        part("could not remove the unfinished checkpoints", lambda: d.events.abandon(
            "not committed: the run ended before its shards were written").raise_error())
    for closable in (d.progress, d.metrics):
        if closable is not None:
            part("could not close the metrics", closable.close)
    if d.alerts is not None:
        part("could not deliver the alerts", d.alerts.close)  # webhooks still being posted
    part("could not write the run's results", lambda: results(True))
    if state != told:  # interrupted during the end work: status.json and summary.json say so
        part("could not write status.json", lambda: d.write_status(state, why()))
        part("could not write the run's results", lambda: results(False))
    return state, interrupted, summary

def summarize(d: RunEnd, wall_s: float, interrupted=None, state: str = "finished", reason: str | None = None,
               report: bool = True) -> RunSummary:
    cfg, ck, t = d.cfg, d.checkpoints, d.history.totals
    last = d.history[-1] if d.history else None
    d.goodput.steps_done = t.steps
    summary = RunSummary(
        run_dir=str(d.run_dir), steps_done=t.steps, final_loss=last["loss"] if last else None,
        val_loss=d.val_loss if last else None,
        tokens_per_s=t.tokens_per_s if t.steps else 0.0,
        steps_per_s=t.steps_per_s if t.steps else 0.0, wall_time_s=wall_s, device_steps_per_s=t.device_steps_per_s,
        idle_share=t.mean_after_first("idle_share"), idle_s=t.mean_after_first("idle_s"),
        other_calls_s=t.mean_after_first("other_calls_s"),
        stopped_by_signal=d.stop_signal, resumed_from_step=d.recovery.resumed_from_step,
        checkpoints_committed=list(ck.committed_steps), checkpoints_failed=list(ck.failed_steps),
        checkpoint_bytes=ck.bytes_saved, checkpoint_write_s=ck.write_seconds,
        checkpoint_commit_s=ck.commit_seconds, restore_s=d.recovery.restore_s,
        recoveries=d.healer.recoveries, incidents=d.healer.report(), faults_injected=d.injector.fired,
        goodput=d.goodput.to_dict(), run_id=ck.run_id,
        monitoring_s=d.status.seconds + (d.metrics.seconds if d.metrics else 0.0), state=state, reason=reason,
        accuracy_before=d.rl.accuracy_before if d.rl else None, accuracy_after=d.rl.accuracy_after if d.rl else None)
    if t.steps or not (d.run_dir / "summary.json").exists():
        write_results(d.run_dir, summary, d.goodput.to_dict(), cfg.monitor.report and report, interrupted)
    elif interrupted is not None:  # nothing trained: a finished run's results are not overwritten by nothing
        for name in ("summary.json", "goodput.json", "report.html"):
            interrupted.not_written[name] = "no step had finished; the earlier results are left as they were"
    return summary


def nothing_to_do(plan: Any, steps: int, run_dir: Path) -> RunSummary:
    """A run whose checkpoint is at train.steps already: nothing is started, nothing written."""
    log.info("the checkpoint of step %d is at train.steps=%d: the run is complete, nothing to do", plan.step, steps)
    return RunSummary(str(run_dir), 0, None, None, 0.0, 0.0, 0.0, resumed_from_step=plan.step, run_id=plan.run_id)


def failure_of(e: BaseException, run_dir: Path) -> tuple[BaseException, str]:
    """The run's own error as raised after its end work, and the reason status.json and summary.json give."""
    if full(e) and not isinstance(e, DiskFull):  # a write of a library (TensorBoard's, a tokenizer's)
        e = DiskFull(e.filename or run_dir, None, FIX)
    return e, str(e) if isinstance(e, RunError) else f"{type(e).__name__}: {e}"


def raise_failure(failure: BaseException, newest: int | None) -> None:
    """Raise the run's error after its end work; a full disk says where the run stands and how to go on, in the
    same one line (`newest`: the newest committed checkpoint)."""
    if isinstance(failure, DiskFull):
        at = f"its newest committed checkpoint is step {newest}" if newest else "it has no committed checkpoint"
        raise RunError(f"{failure}; the run stopped, {at}: resume with train.resume=latest once there is room") \
            from failure
    raise failure


def _settle_before_shutdown(d: RunEnd) -> None:
    """A run that fails still commits the checkpoints whose shards are written (they do not depend on the step
    that failed), but not one whose step's record never reached metrics.jsonl (a full run directory: a
    committed checkpoint's step is in the log); what cannot finish within a minute is left uncommitted, and
    what is not committed has its folder removed."""
    out = d.events.finish(d.devices.actors, min(60.0, d.cfg.cluster.step_timeout_s),
                          commit_through=d.history.recorded_through)
    if out.committed:
        log.info("committed checkpoint(s) %s before stopping", out.committed)
    out.raise_error()


__all__ = ["RunEnd", "end_work", "summarize", "nothing_to_do", "failure_of", "raise_failure"]
