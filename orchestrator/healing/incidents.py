"""What the night watch records: an Incident (a failure or an anomaly, what it cost, what was done), and the
StepFailure a failed step raises with its incidents."""
from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config.base import StrEnum


class IncidentKind(StrEnum):
    """What an incident is (a str Enum: incidents.jsonl, alerts and metrics keep the plain names). An alert's
    incident is `alert:<rule>`, outside this list."""
    DEAD = "dead"                # the device's process is gone
    CRASH = "crash"              # its step raised
    HANG = "hang"                # its step did not finish within the deadline (it is killed)
    COLLECTIVE = "collective"    # only collective errors: the failing peer could not be told apart
    SLOW = "slow"                # a straggler: its own work slower than the others', steps in a row
    NAN = "nan"                  # a non-finite loss or gradient norm (the update was not applied)
    LOSS_SPIKE = "loss_spike"
    GRAD_SPIKE = "grad_spike"
    CHECKPOINT = "checkpoint"    # a checkpoint did not commit
    RESTORE = "restore"          # recovery found a state it cannot restore
    ROLLOUT = "rollout"          # a rollout worker of a separate pool failed (its prompts generated again elsewhere)


REPLACE = frozenset({IncidentKind.DEAD, IncidentKind.CRASH, IncidentKind.HANG, IncidentKind.SLOW})
"""Incident kinds healed by replacing the device."""


@dataclass
class Incident:
    step: int
    kind: str            # an IncidentKind, or alert:<rule>
    rank: int            # -1: not one device
    node: str | None
    time: float
    detail: str
    detect_s: float = 0.0    # from the step's start to the failure being known
    recover_s: float = 0.0   # from detection to the devices being ready to replay
    rewound_to: int = -1     # the step everyone went back to; steps recomputed = step - 1 - rewound_to
    action: str = ""         # replaced | rolled back | skipped | recorded | retried | stopped
    source: str = ""         # what state was restored from: snapshot | checkpoint | initial


class StepFailure(Exception):
    def __init__(self, step: int, incidents: list[Incident], started: float):
        super().__init__(f"step {step} failed: " + "; ".join(f"device {i.rank} {i.kind}: {i.detail}" for i in incidents))
        self.step, self.incidents, self.started = step, incidents, started


