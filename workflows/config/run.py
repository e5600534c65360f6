"""The run config: one YAML file that describes a whole run (profile -> plan -> generate -> FID -> report).

Example (only `output` is required; each value shown besides `name` and `output` is its default, as
`tests/test_schemas.py` checks)::

    name: demo
    model:
      checkpoint: demo            # a .safetensors / .pth path, a URI, or "demo" for the shipped demo model
      in_channels: 3              # only read for raw apple .pth files
    calibration:
      data: null                  # dataset name or image folder; null: the model's own sequential samples
      num_images: 32              # rounded up to whole batches of sampling.batch_size (the batch the plan is for)
    plan:
      tol: 1.0e-3                 # auto plan: max abs error of final images vs sequential sampling
      path: null                  # or a given plan JSON (then no profile stage runs)
      hand: null                  # or a paper-style hand plan such as 7-8-32-10
    sampling:                     # the sampling spec (tarflow.SamplingSpec), as generation uses it
      seed: 0
      labels: null                # uniform | none | [class ids] | null (uniform if the model has classes)
      guidance: {scale: 0.0, annealed: false, attn_temp: 1.0, what: ab}
      denoise: {multiplier: 0.0, noise_std: null}    # null noise_std: the checkpoint's
      batch_size: 16
      autocast: fp32              # fp32 | bf16 | fp16
    samples:
      num_samples: 1000
      shard_size: 1024
    fid:
      extractor: mnist5k-classifier   # or inception-v3-torchscript (offline), inception-v3-compat (+ weights)
      reference: mnist5k          # dataset name, image folder, shards URI, or statistics (.npz, .pth)
      weights: null
      batch_size: 200
      reference_extractor: null   # what made mu-sigma statistics (ADM/TTUR .npz files do not say)
      reference_image_size: null  # their image size, where the file does not say
      kid_samples: 2000           # features per side kept for KID (0: no KID)
      metrics: [fid, is, kid]     # also prc: precision, recall, F (exact; passes over reference images)
      dinov2_weights: null        # fd-dinov2's weights (Meta's .pth); null: torch hub
      enabled: true
    report:
      scaling_batch_sizes: []     # also profile, plan and time at these batch sizes: speedup vs batch size
      fid_sequential: false       # also the same ids drawn sequentially: both FIDs, difference +- its error
    output: runs/demo             # local path or any pyarrow.fs URI (s3://, gs://)
    resources:                    # Ray resources per stage, per worker; a worker given a GPU samples on CUDA
      profile:  {actors: 1, num_cpus: 1, num_gpus: 0}   # one task per block
      generate: {actors: 1, num_cpus: 1, num_gpus: 0}   # also runs the plan's verification and the report's timings
      fid:      {actors: 1, num_cpus: 1, num_gpus: 0}

Relative input paths are found beside the config or in a parent directory (`resolve_paths`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from tarflow import ModelRef, SamplingSpec
from tarflow.spec import MAX_BATCH

from .errors import load_yaml
from .stages import CONFIG, FidSettings, Resources, SampleSet

class CalibrationSection(BaseModel):
    model_config = CONFIG

    data: str | None = Field(None, description="dataset name (mnist5k, digits) or image folder; null: the model's "
                                               "own sequential samples")
    num_images: int = Field(32, ge=1, le=100_000, description="calibration images, rounded up to whole batches")


class PlanSection(BaseModel):
    model_config = CONFIG

    # `tarflow.plan.check_tolerance`'s rule, as a constraint the JSON Schema shows
    tol: float = Field(1e-3, gt=0, description="auto plan: max abs error of final images vs sequential sampling")
    path: str | None = Field(None, description="a given plan JSON (no profile stage)")
    hand: str | None = Field(None, description="a paper-style hand plan such as 7-8-32-10")

    @model_validator(mode="after")
    def _one_source(self):
        if self.path and self.hand:
            raise ValueError("plan.path and plan.hand are both set: give one plan source (path: a plan JSON, "
                             "hand: a paper-style plan, neither: the auto plan from tol)")
        return self

    @property
    def source(self) -> str:
        """Where the plan comes from: 'path', 'hand' or 'auto' (profile + scheduler)."""
        return "path" if self.path else "hand" if self.hand else "auto"


class ReportSection(BaseModel):
    model_config = CONFIG

    scaling_batch_sizes: list[Annotated[int, Field(ge=1, le=MAX_BATCH)]] = Field(
        default_factory=list, description="batch sizes at which the report also profiles the model, schedules an "
        "auto plan (plan.tol) and times it against sequential, for its speedup-vs-batch-size section; with an auto "
        "plan the run's own batch size is a point too, from the comparison. []: no such section")
    fid_sequential: bool = Field(False, description="also draw the same sample ids sequentially and show their "
                                 "FID beside the plan's, with the difference and its uncertainty (jackknife over "
                                 "groups of ids); a second sample set, unless the plan is sequential. Needs FID on")


class FidSection(FidSettings):
    reference: str = Field("mnist5k", description="dataset name, image folder, shards URI, or statistics (the "
                           "project's .npz, a torchmetrics FID state .pth, an ADM/TTUR mu-sigma .npz)")
    enabled: bool = True


def _one_cpu() -> Resources:
    return Resources(num_cpus=1.0)


class ResourcesSection(BaseModel):
    model_config = CONFIG

    profile: Resources = Field(default_factory=_one_cpu)
    generate: Resources = Field(default_factory=_one_cpu)
    fid: Resources = Field(default_factory=_one_cpu)


class RunConfig(BaseModel):
    model_config = CONFIG

    output: str = Field(min_length=1, description="local path or any pyarrow.fs URI (s3://, gs://)")
    name: str = Field("run", min_length=1)
    model: ModelRef = ModelRef()
    calibration: CalibrationSection = CalibrationSection()
    plan: PlanSection = PlanSection()
    sampling: SamplingSpec = SamplingSpec()
    samples: SampleSet = SampleSet()
    fid: FidSection = FidSection()
    report: ReportSection = ReportSection()
    resources: ResourcesSection = ResourcesSection()

    @model_validator(mode="after")
    def _fid_for_the_comparison(self):
        if self.report.fid_sequential and not self.fid.enabled:
            raise ValueError("report.fid_sequential compares FIDs, and fid.enabled is false: turn FID on or the "
                             "comparison off")
        return self

    @classmethod
    def load(cls, path) -> "RunConfig":
        path = Path(path)
        return load_yaml(cls, path, "run config").resolve_paths(path.resolve().parent)

    def resolve_paths(self, base_dir: Path) -> "RunConfig":
        """A copy with relative input paths made absolute, so a run works from any directory and inside a
        Ray job. An input path is looked up beside the config, then in each parent directory (configs live in
        jobs/configs/ and name project-relative files); one found nowhere is left for the stage to report.
        A relative `output` is relative to the current directory, as on any command line."""

        def resolve(value: str | None) -> str | None:
            if value is None or "://" in value or Path(value).is_absolute():
                return value
            for root in (base_dir, *base_dir.parents):
                if (root / value).exists():
                    return str((root / value).resolve())
            return value

        def looks_like_path(value: str | None) -> bool:  # dataset names (mnist5k) stay names
            return bool(value) and ("/" in value or bool(Path(value).suffix))

        model = self.model
        if model.checkpoint != "demo":
            model = ModelRef(resolve(model.checkpoint), model.in_channels)
        data = self.calibration.data
        return self.model_copy(update={
            "model": model,
            "plan": self.plan.model_copy(update={"path": resolve(self.plan.path)}),
            "calibration": self.calibration.model_copy(update={"data": resolve(data) if looks_like_path(data)
                                                                    else data}),
            "fid": self.fid.model_copy(update={
                "reference": resolve(self.fid.reference) if looks_like_path(self.fid.reference) else self.fid.reference,
                "weights": resolve(self.fid.weights)}),
            "output": self.output if "://" in self.output else str(Path(self.output).resolve()),
        })
