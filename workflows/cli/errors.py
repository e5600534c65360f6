"""The errors a command reports as a message (exit 1) rather than a traceback: every error class the
project raises for bad input or a refusing environment, and the OS's own for files."""
from __future__ import annotations


def expected_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from tarflow import CheckpointError, SchemaError
    from tarflow.data import DatasetError

    from ..fidelity.registry import ExtractorError
    from ..fidelity.stats import StatsError
    from ..pipeline import PipelineError
    from ..runtime import ClusterError
    from ..stages.fid import EvaluateError
    from ..stages.generate import GenerateError
    from ..storage.history import HistoryError
    from ..storage.lease import LeaseError
    from ..storage.shards import ShardError

    return (SchemaError, CheckpointError, DatasetError, FloatingPointError, ExtractorError, StatsError,
            PipelineError, ClusterError, EvaluateError, GenerateError, HistoryError, LeaseError, ShardError,
            ValidationError, OSError)
