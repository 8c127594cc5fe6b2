"""The driver: the one owner of a run. loop.py is the Driver and its explicit states (RunState); start.py what a
run does before its first step (checks, devices, monitoring); finish.py the final checkpoint and validation;
end.py what every run does at its end, whatever ended it. Each helper module gets the services it works on, never
the Driver."""
from orchestrator.driver.loop import Driver, RunState

__all__ = ["Driver", "RunState"]
