"""The nightly config: which run configs to measure every night, and the regression thresholds.

Example::

    output: runs/nightly                       # each night writes <output>/<run id>/<model>/ and report.html
    history: runs/nightly/history              # a folder of Parquet files, one per night (default <output>/history)
    thresholds:
      max_speedup_drop: 0.2                    # fail when speedup < (1 - 0.2) x the last passing run's
      max_fid_rise: 0.1                        # fail when the plan's FID > (1 + 0.1) x the last passing run's
      fid_noise_sigmas: 2.0                    # fail when the plan's FID > sequential's on the same ids + 2
                                               # standard errors of sequential's (its own sampling noise)
      max_abs_error: 1.0e-3                    # fail when the plan deviates from sequential by more
      max_metric_worsening: {}                 # e.g. {precision: 0.05, sfid: 0.1}: per metric of fid.metrics
    models:
      - config: jobs/configs/demo.yaml         # a run config; its output is replaced by the night's folder
        hand_plans: ["3-8-32-10"]              # optional paper-style plans, timed and FID'd beside the auto plan
        fid_sequential: true                   # also the FID of the same N ids drawn sequentially
        num_samples: null                      # FID over this many samples instead of the run config's

On a cluster the history and output must be URIs (s3://, gs://): the job's driver runs on a pod that goes
with the cluster (`workflows.pipeline.nightly.check_durable`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from ..fidelity.registry import BETTER_HIGHER, NOISE_SIGMAS
from .errors import ConfigError, load_yaml
from .stages import CONFIG


class Thresholds(BaseModel):
    model_config = CONFIG

    max_speedup_drop: float = Field(0.2, ge=0, lt=1, description="allowed fractional drop of the speedup")
    max_fid_rise: float = Field(0.1, ge=0, description="allowed fractional rise of the plan's FID")
    fid_noise_sigmas: float = Field(NOISE_SIGMAS, gt=0, description="allowed excess of the plan's FID over "
                                    "sequential's on the same sample ids, in standard errors of sequential's FID "
                                    "(its sampling noise, by the jackknife); judged where fid_sequential is on")
    max_abs_error: float = Field(1e-3, gt=0, description="allowed max abs deviation from sequential sampling")
    max_metric_worsening: dict[Literal[tuple(BETTER_HIGHER)], Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict, description="per metric of the FID pass (fid.metrics), the allowed fractional "
                                          "worsening in its direction, e.g. {precision: 0.05, sfid: 0.1}")


class NightlyModel(BaseModel):
    model_config = CONFIG

    config: str = Field(min_length=1, description="a run config (YAML) with an auto plan")
    hand_plans: list[str] = Field(default_factory=list, description="paper-style plans such as 7-8-32-10")
    fid_sequential: bool = Field(True, description="also the FID of the same sample ids drawn sequentially, the "
                                 "difference and its uncertainty (the run's report.fid_sequential)")
    num_samples: int | None = Field(None, ge=1, description="samples per night for FID (null: the run config's); "
                                    "fewer than a published 50k make a trend, not a paper's figure")


class NightlyConfig(BaseModel):
    model_config = CONFIG

    output: str = Field(min_length=1, description="where each night's folder and report go (local path or URI)")
    history: str | None = Field(None, min_length=1, description="the history table (local path or URI); "
                                "null: <output>/history")
    models: list[NightlyModel] = Field(min_length=1)
    thresholds: Thresholds = Thresholds()

    @classmethod
    def load(cls, path, output: str | None = None) -> "NightlyConfig":
        """Read and check a nightly config: every model's run config must exist (beside it or above).
        `output` replaces the config's (an unset history goes along, under it); local paths are made absolute."""
        path = Path(path)
        cfg = load_yaml(cls, path, "nightly config")
        base = path.resolve().parent
        models = []
        for i, m in enumerate(cfg.models):
            found = next((root / m.config for root in (base, *base.parents) if (root / m.config).is_file()), None)
            if found is None:
                raise ConfigError(f"{path}: models[{i}].config={m.config!r}: no such run config beside the nightly "
                                  "config or above it")
            models.append(m.model_copy(update={"config": str(found)}))
        output = output or cfg.output
        absolute = {k: v if "://" in v else str(Path(v).resolve()) for k, v in (
            ("output", output), ("history", cfg.history or f"{output.rstrip('/')}/history"))}
        return cfg.model_copy(update={"models": models, **absolute})
