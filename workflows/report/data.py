"""What a report shows, as JSON-able dataclasses: filled by the pipeline (one model, its plan vs
sequential) or by the nightly job (every configured model, hand plans, the history table), and
written beside the page as `report-data.json`, from which `tarflow-gs report` can render it again.

Every number is checked when an object is made, assigned and read (`report --data`): finite, in range,
no unknown fields. What was not measured is None (a FID not computed, a block metric without a
profile), or 0 where the field says so, never NaN."""
from __future__ import annotations

from dataclasses import field
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from pydantic.dataclasses import dataclass

from tarflow.schema import JSONForm

from ..fidelity.paired import FidDifference
from ..storage.history import MEASURED, METRIC_NAMES, Fid, HistoryRow


@dataclass(config=MEASURED)
class SamplerResult:
    """One sampler (sequential, the auto plan, a hand plan) on one model, on the same noise as sequential."""

    plan: str
    seconds: PositiveFloat
    passes: PositiveInt
    speedup: PositiveFloat = 1.0
    max_abs_error: NonNegativeFloat = 0.0
    fallbacks: NonNegativeInt = 0
    fid: Fid = None
    grid_png: str | None = None  # base64 PNG of a sample grid
    metrics: dict[Literal[METRIC_NAMES], float] = field(default_factory=dict)  # the others of its FID pass


@dataclass(config=MEASURED)
class BlockResult:
    """One block of the plan, by forward index (the last block is sampled first)."""

    block: NonNegativeInt
    solver: str
    segment_len: PositiveInt
    init: str
    iterations: NonNegativeFloat  # mean Jacobi iterations per segment in the comparison run
    passes: NonNegativeInt
    crm_share: Annotated[float, Field(ge=0, le=1)] | None = None  # None here and below: no profile
    igm_z: NonNegativeFloat | None = None
    igm_zeros: NonNegativeFloat | None = None


@dataclass(config=MEASURED)
class Curve:
    label: str
    values: list[NonNegativeFloat]


@dataclass(config=MEASURED)
class ScalingPoint:
    """Sequential vs the auto plan for one batch size, on the same noise (sample ids 0..n-1), on the
    comparison's device and threads: where plans pay on this hardware."""

    batch_size: PositiveInt
    sequential_seconds: PositiveFloat  # per image
    plan_seconds: PositiveFloat  # per image
    speedup: PositiveFloat
    bound_speedup: PositiveFloat  # one parallel pass per block over sequential: no plan can beat it
    plan: str  # Plan.summary()
    fallback: str | None = None  # why the scheduler raced its plan and chose sequential, if it did
    max_abs_error: NonNegativeFloat = 0.0


@dataclass(config=MEASURED)
class ModelResult:
    name: str
    model_hash: str = ""
    device: str = "cpu"
    batch_size: NonNegativeInt = 0  # 0: no comparison ran
    runs: list[SamplerResult] = field(default_factory=list)
    blocks: list[BlockResult] = field(default_factory=list)
    convergence: list[Curve] = field(default_factory=list)
    fid_extractor: str = ""  # "" and 0 samples: no FID
    fid_num_samples: NonNegativeInt = 0
    scaling: list[ScalingPoint] = field(default_factory=list)  # by batch size; empty: not measured
    # the plan's FID beside sequential's over the same ids, with the uncertainties; None: not compared
    fid_difference: FidDifference | None = None

    def run(self, plan: str) -> SamplerResult | None:
        return next((r for r in self.runs if r.plan == plan), None)


@dataclass(config=MEASURED)
class ReportData(JSONForm):
    title: str
    models: list[ModelResult] = field(default_factory=list)
    history: list[HistoryRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    json_name = "report data"
