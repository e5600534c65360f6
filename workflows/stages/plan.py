"""The plan stage: the scheduler (`tarflow.schedule`) in a Ray task with the generate stage's resources.

Its verification rounds sample the calibration and held-out noise, and its final race times the
plan against sequential sampling: both must run where generation will, on the device and with
the torch threads a generate worker gets, or a race on the driver's CPU could throw away a plan
the GPU profile found faster. So they run in a task with the generate stage's resources."""
from __future__ import annotations

from tarflow import ModelRef, Plan
from tarflow.profile import Profile
from tarflow.schedule import schedule

from .. import runtime
from ..config import Resources


def _schedule(profile: Profile, model_ref: ModelRef, tol: float) -> Plan:
    return schedule(profile, model_ref.load(), tol=tol, device=runtime.worker_device())


def auto_plan(profile: Profile, model_ref: ModelRef, tol: float, resources: Resources) -> tuple[Plan, dict]:
    """(the auto plan, the placement of the task that verified and raced it)."""
    runtime.connect()
    plan, placement = runtime.run_task(_schedule, profile, model_ref, tol, res=resources)
    plan.evidence["placement"] = placement
    return plan, placement
