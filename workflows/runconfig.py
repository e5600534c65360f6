"""The run config: one YAML file that describes a whole run (profile -> plan -> generate -> FID -> report).

Example (only `output` is required; the values shown for sections left out are their defaults)::

    name: demo
    device: cpu                   # cpu | cuda
    model:
      checkpoint: demo            # a .safetensors / .pth path, or "demo" for the shipped demo model
      in_channels: 1              # only read for raw apple .pth files
    calibration:
      data: mnist5k               # dataset name or image folder; null: the model's own sequential samples
      num_images: 32              # rounded up to whole batches of sampling.batch_size (the batch the plan is for)
    plan:
      tol: 1.0e-3                 # auto plan: max abs error vs sequential on the calibration batch
      path: null                  # or a given plan JSON (then no profile stage runs)
      hand: null                  # or a paper-style hand plan such as 7-8-32-10
    sampling:
      num_samples: 1000
      seed: 0
      labels: uniform             # uniform | none | a list of class ids
      guidance: {scale: 0.0, attn_temp: 1.0, annealed: false, what: ab}
      denoise: 0.0                # multiplier of the score-based denoising step; 0: off
      batch_size: 16
      shard_size: 1024
    fid:
      extractor: mnist5k-classifier   # or inception-v3-torchscript (offline), inception-v3-compat (+ weights)
      reference: mnist5k          # dataset name, image folder, shards URI, or stats .npz
      weights: null               # extractor weights file (inception-v3-compat on a machine without internet)
      enabled: true
    output: runs/demo             # local path or any pyarrow.fs URI (s3://, gs://)
    resources:                    # Ray resources per stage, per actor
      profile:  {actors: 1, num_cpus: 1, num_gpus: 0}   # one task per block with num_cpus threads (cuda: 1 GPU each)
      generate: {actors: 1, num_cpus: 1, num_gpus: 0}
      fid:      {actors: 1, num_cpus: 1, num_gpus: 0}

Relative input paths are found beside the config or in a parent directory (see `resolve_paths`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEVICES = ("cpu", "cuda")
LABEL_POLICIES = ("uniform", "none")
GUIDE_WHAT = ("a", "b", "ab")
STAGES_WITH_ACTORS = ("profile", "generate", "fid")


class ConfigError(ValueError):
    """A run config that cannot run: the message names the field and the allowed values."""


def _positive_int(value, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}={value!r}: must be an integer >= {minimum}")
    return value


def _number(value, where: str, minimum: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}={value!r}: must be a finite number")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ConfigError(f"{where}={value!r}: must be {'>' if strict else '>='} {minimum}")
    return float(value)


def _choice(value, where: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}={value!r}: allowed values are {', '.join(map(str, allowed))}")
    return value


def _text(value, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}={value!r}: must be a non-empty string{' or null' if optional else ''}")
    return value


@dataclass
class ModelSection:
    checkpoint: str = "demo"
    in_channels: int = 3

    def validate(self, where: str = "model") -> "ModelSection":
        _text(self.checkpoint, f"{where}.checkpoint")
        _positive_int(self.in_channels, f"{where}.in_channels")
        return self


@dataclass
class CalibrationSection:
    data: str | None = None
    num_images: int = 32

    def validate(self, where: str = "calibration") -> "CalibrationSection":
        _text(self.data, f"{where}.data", optional=True)
        _positive_int(self.num_images, f"{where}.num_images")
        return self


@dataclass
class PlanSection:
    tol: float = 1e-3
    path: str | None = None
    hand: str | None = None

    def validate(self, where: str = "plan") -> "PlanSection":
        _number(self.tol, f"{where}.tol", 0.0, strict=True)
        _text(self.path, f"{where}.path", optional=True)
        _text(self.hand, f"{where}.hand", optional=True)
        if self.path and self.hand:
            raise ConfigError(f"{where}.path and {where}.hand are both set: give one plan source "
                              "(path: a plan JSON, hand: a paper-style plan, neither: the auto plan from tol)")
        return self

    @property
    def source(self) -> str:
        """Where the plan comes from: 'path', 'hand' or 'auto' (profile + scheduler)."""
        return "path" if self.path else "hand" if self.hand else "auto"


@dataclass
class GuidanceSection:
    scale: float = 0.0
    attn_temp: float = 1.0
    annealed: bool = False
    what: str = "ab"

    def validate(self, where: str = "sampling.guidance") -> "GuidanceSection":
        _number(self.scale, f"{where}.scale", 0.0)
        _number(self.attn_temp, f"{where}.attn_temp", 0.0, strict=True)
        if not isinstance(self.annealed, bool):
            raise ConfigError(f"{where}.annealed={self.annealed!r}: allowed values are true, false")
        _choice(self.what, f"{where}.what", GUIDE_WHAT)
        return self


@dataclass
class SamplingSection:
    num_samples: int = 1000
    seed: int = 0
    labels: str | list[int] = "uniform"
    guidance: GuidanceSection = field(default_factory=GuidanceSection)
    denoise: float = 0.0
    batch_size: int = 16
    shard_size: int = 1024

    def validate(self, where: str = "sampling") -> "SamplingSection":
        _positive_int(self.num_samples, f"{where}.num_samples")
        _positive_int(self.seed, f"{where}.seed", minimum=0)
        if isinstance(self.labels, list):
            if not self.labels:
                raise ConfigError(f"{where}.labels=[]: give at least one class id, or 'uniform' / 'none'")
            for i, y in enumerate(self.labels):
                _positive_int(y, f"{where}.labels[{i}]", minimum=0)
        elif self.labels not in LABEL_POLICIES:
            raise ConfigError(f"{where}.labels={self.labels!r}: allowed values are "
                              f"{', '.join(LABEL_POLICIES)}, or a list of class ids")
        self.guidance.validate(f"{where}.guidance")
        _number(self.denoise, f"{where}.denoise", 0.0)
        _positive_int(self.batch_size, f"{where}.batch_size")
        _positive_int(self.shard_size, f"{where}.shard_size")
        return self


@dataclass
class FidSection:
    extractor: str = "mnist5k-classifier"
    reference: str = "mnist5k"
    weights: str | None = None
    enabled: bool = True

    def validate(self, where: str = "fid") -> "FidSection":
        from .extractors import EXTRACTORS

        _choice(self.extractor, f"{where}.extractor", tuple(EXTRACTORS))
        _text(self.reference, f"{where}.reference")
        _text(self.weights, f"{where}.weights", optional=True)
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"{where}.enabled={self.enabled!r}: allowed values are true, false")
        return self


@dataclass
class StageResources:
    """Ray resources of one stage: `actors` workers, each reserving `num_cpus` and `num_gpus`."""

    actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def validate(self, where: str) -> "StageResources":
        _positive_int(self.actors, f"{where}.actors")
        _number(self.num_cpus, f"{where}.num_cpus", 0.0, strict=True)
        _number(self.num_gpus, f"{where}.num_gpus", 0.0)
        return self


@dataclass
class ResourcesSection:
    profile: StageResources = field(default_factory=StageResources)
    generate: StageResources = field(default_factory=StageResources)
    fid: StageResources = field(default_factory=StageResources)

    def validate(self, where: str = "resources") -> "ResourcesSection":
        for stage in STAGES_WITH_ACTORS:
            getattr(self, stage).validate(f"{where}.{stage}")
        return self


@dataclass
class RunConfig:
    output: str
    model: ModelSection = field(default_factory=ModelSection)
    name: str = "run"
    device: str = "cpu"
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    plan: PlanSection = field(default_factory=PlanSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    fid: FidSection = field(default_factory=FidSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)

    def validate(self) -> "RunConfig":
        _text(self.name, "name")
        _text(self.output, "output")
        _choice(self.device, "device", DEVICES)
        self.model.validate()
        self.calibration.validate()
        self.plan.validate()
        self.sampling.validate()
        self.fid.validate()
        self.resources.validate()
        uses_gpu = any(getattr(self.resources, s).num_gpus > 0 for s in STAGES_WITH_ACTORS)
        if uses_gpu and self.device != "cuda":
            raise ConfigError("resources request num_gpus > 0 but device='cpu': set device: cuda, "
                              "or num_gpus: 0 for every stage")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d, base_dir: Path | None = None) -> "RunConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a run config must be a mapping of sections, got {type(d).__name__}")
        cfg = _build(cls, d, "")
        if base_dir is not None:
            cfg.resolve_paths(Path(base_dir))
        return cfg.validate()

    @classmethod
    def from_yaml(cls, text: str, base_dir: Path | None = None) -> "RunConfig":
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"run config is not valid YAML: {e}") from e
        return cls.from_dict(d, base_dir)

    @classmethod
    def load(cls, path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"run config not found: {path}")
        try:
            return cls.from_yaml(path.read_text(), base_dir=path.resolve().parent)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def resolve_paths(self, base_dir: Path) -> None:
        """Make relative input paths absolute, so a run works from any directory and inside a Ray job.

        An input path is looked up beside the config, then in each parent directory (configs live in
        jobs/configs/ and name project-relative files); one found nowhere is left for the stage to report.
        A relative `output` is relative to the current directory, as on any command line."""

        def resolve(value: str | None) -> str | None:
            if value is None or "://" in value or Path(value).is_absolute():
                return value
            for root in (base_dir, *base_dir.parents):
                if (root / value).exists():
                    return str((root / value).resolve())
            return value

        if self.model.checkpoint != "demo":
            self.model.checkpoint = resolve(self.model.checkpoint)
        self.plan.path = resolve(self.plan.path)
        # dataset names (mnist5k) stay names; only values that look like paths are resolved
        if self.calibration.data and ("/" in self.calibration.data or Path(self.calibration.data).suffix):
            self.calibration.data = resolve(self.calibration.data)
        if "/" in self.fid.reference or Path(self.fid.reference).suffix:
            self.fid.reference = resolve(self.fid.reference)
        self.fid.weights = resolve(self.fid.weights)
        if "://" not in self.output:
            self.output = str(Path(self.output).resolve())


def _build(cls, d: dict, where: str):
    """Construct dataclass `cls` from a mapping, refusing unknown keys and descending into sections."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(where + k for k in unknown)}; "
                          f"allowed in {where.rstrip('.') or 'the config'}: {', '.join(fields)}")
    required = [name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in d]
    if missing:
        raise ConfigError(f"missing required field(s) {', '.join(where + k for k in missing)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {} if value is None else value, f"{where}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)
