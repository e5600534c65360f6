"""Stage keys: each stage's output is named by a hash of that stage's inputs, so an output that exists
for the same inputs is reused, and a changed input re-runs only the stages downstream of it.

Each key is a plain function of the run config and of what the stages before it produced (their
keys, the plan, the samples' identity), testable without Ray. Their values must not change for the
same inputs: a run made by an earlier version would be recomputed rather than skipped
(`tests/test_pipeline.py` pins them).
"""
from __future__ import annotations

import hashlib
import json

from tarflow import Plan, SamplingSpec

from ..config import RunConfig
from ..fidelity.paired import JACKKNIFE_GROUPS
from ..stages.generate import RunIdentity


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def profile(cfg: RunConfig, spec: SamplingSpec, model_hash: str) -> str:
    """The model, the calibration, the whole sampling spec, the profile workers' resources."""
    return _hash("profile", model_hash, cfg.calibration.model_dump(), spec.to_dict(),
                 cfg.resources.profile.model_dump())


def plan(cfg: RunConfig, spec: SamplingSpec, model_hash: str, profile_key: str | None,
         given_plan: Plan | None) -> str:
    """The plan section, the spec, the generate workers' resources (the plan is raced there) and the plan's
    source: the profile (`profile_key`, None without one) or a given plan."""
    return _hash("plan", model_hash, cfg.plan.model_dump(), spec.to_dict(), cfg.resources.generate.model_dump(),
                 profile_key, given_plan.to_dict() if given_plan else None)


def generate(cfg: RunConfig, identity: RunIdentity) -> str:
    """What decides the images (`identity`) as far as it is known before a worker starts: whether the workers
    get GPUs stands for their device type; the image shape and classes follow from the model hash."""
    return _hash("generate", identity.model_hash, identity.plan_hash, identity.spec,
                 {"num_samples": identity.num_samples, "shard_size": identity.shard_size},
                 cfg.resources.generate.num_gpus > 0, identity.numerics.threads)


# FID settings added after runs were keyed, with the value those runs had: at that value a setting is left out of
# the key, so an earlier run's FID stage is found again
FID_ADDED = {"metrics": ["fid", "is", "kid"], "dinov2_weights": None}


def fid(cfg: RunConfig, generate_key: str) -> str | None:
    """The samples and the FID settings; None where FID is off."""
    settings = {k: v for k, v in cfg.fid.model_dump().items() if k not in FID_ADDED or v != FID_ADDED[k]}
    return _hash("fid", generate_key, settings) if cfg.fid.enabled else None


def paired_fid(cfg: RunConfig, generate_key: str, sequential_key: str) -> str:
    """Both sample sets, the FID settings and the jackknife's groups."""
    return _hash("fid-paired", generate_key, sequential_key, cfg.fid.model_dump(), JACKKNIFE_GROUPS)


# report settings added after runs were keyed, at the value those runs had (as FID_ADDED)
REPORT_ADDED = {"fid_sequential": False}


def report(cfg: RunConfig, generate_key: str, fid_key: str | None, paired_key: str | None = None) -> str:
    """The samples, their FID (None: off), the paired FID (None: off), the run's name and the report section."""
    settings = {k: v for k, v in cfg.report.model_dump().items() if k not in REPORT_ADDED or v != REPORT_ADDED[k]}
    return _hash("report", generate_key, fid_key, cfg.name, settings, *([paired_key] if paired_key else []))
