"""Orchestration: the whole run from one config (`run`), and the nightly speed/quality job (`nightly`)."""
from .runner import PipelineError, RunResult, StageRecord, run, summary_text

__all__ = ["PipelineError", "RunResult", "StageRecord", "run", "summary_text"]
