"""Who hears about a run as it goes: listeners, each called once per event. A step's record, an incident the
healer decided, an alert fired, a checkpoint event (started after its step's record, committed, failed), a
rewind (a recovery goes back to an earlier step). The driver notifies the list; it never fans an event out to
the sinks by hand. MetricsStream (metrics.jsonl and its sinks), IncidentLog (incidents.jsonl) and AlertEngine
(alert rules on incidents, its state on a rewind) are listeners."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from orchestrator.monitoring.rundir import append_jsonl


class RunListener:
    """A listener overrides the events it cares about; the others do nothing."""

    def on_record(self, record: dict[str, Any]) -> None:
        """A completed step's record (a replayed step's again, after a rewind)."""

    def on_incident(self, incident: dict[str, Any]) -> None:
        """An incident, once the healer has decided its action (an Incident as a dict)."""

    def on_alert(self, alert: Any) -> None:
        """An alert fired (monitoring.alerts.Alert), whether by a step's record or by an incident."""

    def on_checkpoint(self, event: dict[str, Any]) -> None:
        """A checkpoint event line: {"event": "checkpoint_started" | "checkpoint_committed" | "checkpoint_failed",
        "step", "time", ...}."""

    def on_rewind(self, back: int) -> None:
        """The run goes back to after step `back` (a recovery): what came after it is replayed."""


class IncidentLog(RunListener):
    """incidents.jsonl: one line per incident (DiskFull when the run directory is full)."""

    def __init__(self, path: Path):
        self.path = path

    def on_incident(self, incident: dict[str, Any]) -> None:
        append_jsonl(self.path, incident)


class Listeners:
    """The run's listeners, notified in order. Every listener hears an event even where an earlier one fails (a full
    run directory must not cost an alert its webhook); the first error is raised after."""

    def __init__(self, *listeners: RunListener | None):
        self.listeners = [x for x in listeners if x is not None]

    def add(self, *listeners: RunListener | None) -> None:
        self.listeners.extend(x for x in listeners if x is not None)

    def record(self, record: dict[str, Any]) -> None:
        self._notify("on_record", record)

    def incident(self, incident: dict[str, Any]) -> None:
        self._notify("on_incident", incident)

    def incidents(self, incidents: Iterable[Any]) -> None:
        """Each incident (a dataclass: Healer.take_new) as a dict to every listener."""
        self._deliver(("on_incident", asdict(incident)) for incident in incidents)

    def alert(self, alert: Any) -> None:
        self._notify("on_alert", alert)

    def checkpoint(self, event: dict[str, Any]) -> None:
        self._notify("on_checkpoint", event)

    def rewind(self, back: int) -> None:
        self._notify("on_rewind", back)

    def _notify(self, method: str, payload: Any) -> None:
        self._deliver([(method, payload)])

    def _deliver(self, events: Iterable[tuple[str, Any]]) -> None:
        """Every event to every listener, even where one fails; the first error raised after."""
        error = None
        for method, payload in events:
            for listener in self.listeners:
                try:
                    getattr(listener, method)(payload)
                except Exception as e:
                    error = error or e
        if error is not None:
            raise error


__all__ = ["RunListener", "IncidentLog", "Listeners"]
