"""The night watch: faults in (faults.py), detection (watch.py, detectors.py), the recovery policy (healer.py:
observations in, a Decision out), and what each incident records (incidents.py)."""
from orchestrator.healing.faults import Injector, plan_faults
from orchestrator.healing.healer import Decision, Healer
from orchestrator.healing.incidents import Incident, StepFailure
from orchestrator.healing.watch import Watch

__all__ = ["Incident", "StepFailure", "Decision", "Injector", "Watch", "Healer", "plan_faults"]
