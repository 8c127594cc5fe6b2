"""What the night watch records: an Incident (a failure or an anomaly, what it cost, what was done), and the
StepFailure a failed step raises with its incidents."""
from __future__ import annotations

from dataclasses import dataclass

REPLACE = ("dead", "crash", "hang", "slow")   # incident kinds healed by replacing the device


@dataclass
class Incident:
    step: int
    kind: str            # dead | crash | hang | collective | slow | nan | loss_spike | grad_spike | checkpoint |
                         # restore
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


