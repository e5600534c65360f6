"""What a report shows, as JSON-able dataclasses: filled by the pipeline (one model, its plan vs
sequential) or by the nightly job (every configured model, hand plans, the history table), and
written beside the page as `report-data.json`, from which `tarflow-gs report` can render it again."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from tarflow.schema import JSONForm

from ..storage.history import HistoryRow


@dataclass
class SamplerResult:
    """One sampler (sequential, the auto plan, a hand plan) on one model, on the same noise as sequential."""

    plan: str
    seconds: float
    passes: int
    speedup: float = 1.0
    max_abs_error: float = 0.0
    fallbacks: int = 0
    fid: float | None = None
    grid_png: str | None = None  # base64 PNG of a sample grid


@dataclass
class BlockResult:
    """One block of the plan, by forward index (the last block is sampled first)."""

    block: int
    solver: str
    segment_len: int
    init: str
    iterations: float  # mean Jacobi iterations per segment in the comparison run
    passes: int
    crm_share: float | None = None
    igm_z: float | None = None
    igm_zeros: float | None = None


@dataclass
class Curve:
    label: str
    values: list[float]


@dataclass
class ScalingPoint:
    """Sequential vs the auto plan for one batch size, on the same noise (sample ids 0..n-1), on the
    comparison's device and threads: where plans pay on this hardware."""

    batch_size: int
    sequential_seconds: float  # per image
    plan_seconds: float  # per image
    speedup: float
    bound_speedup: float  # one parallel pass per block over sequential: no plan can beat it
    plan: str  # Plan.summary()
    fallback: str | None = None  # why the scheduler raced its plan and chose sequential, if it did
    max_abs_error: float = 0.0


@dataclass
class ModelResult:
    name: str
    model_hash: str = ""
    device: str = "cpu"
    batch_size: int = 0
    runs: list[SamplerResult] = field(default_factory=list)
    blocks: list[BlockResult] = field(default_factory=list)
    convergence: list[Curve] = field(default_factory=list)
    fid_extractor: str = ""
    fid_num_samples: int = 0
    scaling: list[ScalingPoint] = field(default_factory=list)  # by batch size; empty: not measured

    def run(self, plan: str) -> SamplerResult | None:
        return next((r for r in self.runs if r.plan == plan), None)


@dataclass
class ReportData(JSONForm):
    title: str
    models: list[ModelResult] = field(default_factory=list)
    history: list[HistoryRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    json_name = "report data"
