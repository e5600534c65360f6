"""What each stage takes besides the sampling spec: resources, the sample set's layout, FID settings,
and the whole input of the generate stage."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tarflow import ModelRef, Plan, SamplingSpec
from tarflow.spec import MAX_BATCH
from tarflow.schema import STRICT_FIELDS, SchemaError

from ..fidelity.registry import DEFAULT_EXTRACTOR, EXTRACTOR_NAMES, check_weights_allowed, describe_extractors
from ..storage.shards import MAX_SHARD_SIZE, layout_problem

CONFIG = ConfigDict(**STRICT_FIELDS)
METRICS = ("fid", "is", "kid", "prc", "sfid", "fd-dinov2")


class Resources(BaseModel):
    """Ray resources of one stage: up to `actors` workers at once, each reserving `num_cpus` CPUs
    (null: a share that leaves the cluster a CPU for other work, ray#44687) and `num_gpus` GPUs.
    A worker samples on CUDA when Ray gives it a GPU and torch sees one, else on the CPU."""

    model_config = CONFIG

    actors: int = Field(1, ge=1, description="workers (actors or tasks) at once")
    num_cpus: float | None = Field(None, gt=0, description="CPUs per worker; also its torch threads (at least 1)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per worker")


class SampleSet(BaseModel):
    """How many samples a run makes and how they are cut into Parquet shards."""

    model_config = CONFIG

    num_samples: int = Field(1000, ge=1, description="sample ids 0..num_samples-1")
    shard_size: int = Field(1024, ge=1, le=MAX_SHARD_SIZE, description="samples per Parquet shard")

    @model_validator(mode="after")
    def _bounded(self):
        # shard_size is in range by now: a layout out of bounds has too many samples for a set
        if (problem := layout_problem(self.num_samples, self.shard_size)) is not None:
            raise problem
        return self


class FidSettings(BaseModel):
    """The feature extractor FID (and IS, KID) use, what made reference statistics that do not say, the
    images per extraction batch, and how many features KID keeps."""

    model_config = CONFIG

    extractor: Literal[EXTRACTOR_NAMES] = Field(DEFAULT_EXTRACTOR, description=describe_extractors())
    weights: str | None = Field(None, description="extractor weights file, read as tensors (inception-v3-compat: "
                                                  "torch-fidelity's .pth, for no internet)")
    batch_size: int = Field(200, ge=1, le=MAX_BATCH, description="images per extractor call")
    reference_extractor: Literal[EXTRACTOR_NAMES] | None = Field(
        None, description="the extractor that made ADM/TTUR mu-sigma reference statistics (their files do not say)")
    reference_image_size: int | None = Field(
        None, ge=1, description="the image size reference statistics were computed at, where their file does not "
                                "say (ADM/TTUR .npz; a torchmetrics .pth not named <name>_<size>_fid_stats.pth)")
    kid_samples: int = Field(2000, ge=0, le=100_000,
                             description="features per image set kept for KID, a strided subset (0: no KID)")
    metrics: list[Literal[METRICS]] = Field(
        ["fid", "is", "kid"], min_length=1,
        description="what the pass computes: fid (always given), is (Inception Score: one split, and torch-fidelity's "
                    "10), kid, prc (precision, recall and F, k = 3, exact: keeps every feature row, and passes over "
                    "reference images rather than cached statistics), sfid (ADM's spatial FID; inception-v3-compat), "
                    "fd-dinov2 (the Frechet distance in DINOv2 ViT-L/14 features: a second pass, over the samples "
                    "and the reference's images)")
    dinov2_weights: str | None = Field(None, description="fd-dinov2's weights: Meta's dinov2_vitl14_pretrain.pth, "
                                                         "read as tensors (none: torch hub, through torch-fidelity)")

    @field_validator("weights")
    @classmethod
    def _weights_for_its_extractor(cls, weights, info: ValidationInfo):
        if "extractor" in info.data:
            check_weights_allowed(info.data["extractor"], weights)
        return weights


class GenerateConfig(BaseModel):
    """One generation run: which model, how it samples, with which plan, how many samples, where to."""

    model_config = CONFIG

    model: ModelRef
    out: str = Field(min_length=1, description="output directory or URI (file://, s3://, gs://)")
    samples: SampleSet = SampleSet()
    spec: SamplingSpec = SamplingSpec()
    plan: Plan | None = Field(None, description="null: sequential sampling")
    resources: Resources = Resources()
    max_attempts: int = Field(3, ge=1, description="times a worker may die on one shard before the run stops")
    start_timeout_s: float = Field(300.0, gt=0, description="how long the pool may wait for its first worker")
