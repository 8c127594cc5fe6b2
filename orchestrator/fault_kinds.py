"""The names of the kinds of fault a run can inject (`faults.plan[].kind`, `faults.chaos.kinds`); imports nothing.

A str Enum: config values, JSON and logs keep the plain names. What each kind does when injected and how the
night watch catches it is its entry in orchestrator/healing/faults.py (FAULTS); the config only needs the names.
"""
from __future__ import annotations

from enum import StrEnum


class FaultKind(StrEnum):
    KILL = "kill"
    CRASH = "crash"
    HANG = "hang"
    SLOW = "slow"
    NAN = "nan"
    NODE = "node"
    CHECKPOINT = "checkpoint"
