"""The night watch: faults in (faults.py: each kind's rule, the plan, the injector), detection (watch.py,
detectors.py), the recovery policy (healer.py: observations in, a Decision out), and what each incident records
(incidents.py)."""
from orchestrator.healing.faults import FAULTS, FaultRule, Injector, fault_rule, plan_faults
from orchestrator.healing.healer import Decision, Healer
from orchestrator.healing.incidents import Incident, IncidentKind, StepFailure
from orchestrator.healing.watch import Watch

__all__ = ["Incident", "IncidentKind", "StepFailure", "Decision", "FAULTS", "FaultRule", "fault_rule", "Injector", "Watch",
           "Healer", "plan_faults"]
