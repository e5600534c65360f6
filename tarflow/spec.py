"""The sampling spec: everything besides the model and the plan that decides a sample.

One object from the CLI or a run config down to every Ray actor. Sample `i` of a run is
`sample_ids(model, spec, [i], plan)`: its noise comes from (spec.seed, i), its label from
the label policy and i, and the sampling map from guidance, denoising and the autocast
dtype. Profile and scheduler certify a plan under the same spec generation samples with,
and the pipeline's stage keys hash `spec.to_json()`.

JSON form (every field optional; these are the defaults)::

    {"seed": 0, "labels": null, "batch_size": 16, "autocast": "fp32",
     "guidance": {"scale": 0.0, "annealed": false, "attn_temp": 1.0, "what": "ab"},
     "denoise": {"multiplier": 0.0, "noise_std": null}}

`labels`: "uniform" (cycle all classes), "none" (unconditional), a list of class ids to cycle
(-1 = unconditional), or null (uniform for a class-conditional model, none otherwise).
"""
from __future__ import annotations

import dataclasses
import hashlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal, Union

import torch

from .schema import STRICT_FIELDS, SchemaError, check_finite, check_int, to_dict, to_json

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
GUIDE_WHAT = ("a", "b", "ab")


class SpecError(SchemaError):
    """A sampling spec that is invalid, or that does not fit the model it is used with."""


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance as the reference sampler applies it.

    The conditional and unconditional passes share one forward over a 2B batch; `scale` 0 is off.
    `annealed`: the weight grows linearly over tokens, g_t = t / (T-1) * scale. `attn_temp`
    divides the unconditional branch's attention logits. `what`: guide the log-scale `a`, the
    shift `b`, or both."""

    scale: float = 0.0
    annealed: bool = False
    attn_temp: float = 1.0
    what: Literal["a", "b", "ab"] = "ab"

    __pydantic_config__ = STRICT_FIELDS

    def __post_init__(self):
        check_finite(self.scale, "scale", error=SpecError)
        check_finite(self.attn_temp, "attn_temp", strict=True, error=SpecError)
        if self.what not in GUIDE_WHAT:
            raise SpecError(f"allowed values are {', '.join(GUIDE_WHAT)}", "what", self.what)

    @property
    def active(self) -> bool:
        return self.scale > 0

    def combine(self, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The guided (a, b) from the network's output over a [conditional; unconditional] batch and
        the tokens' weights g (`weights`, rows of the tokens produced)."""
        (a_c, a_u), (b_c, b_u) = a.chunk(2), b.chunk(2)
        a = a_c + g * (a_c - a_u) if "a" in self.what else a_c
        b = b_c + g * (b_c - b_u) if "b" in self.what else b_c
        return a, b

    def weights(self, num_tokens: int, device) -> torch.Tensor:
        """(T, 1) guidance weight of the step producing each token."""
        t = torch.arange(num_tokens, device=device, dtype=torch.float32).unsqueeze(1)
        return t / (num_tokens - 1) * self.scale if self.annealed else torch.full_like(t, self.scale)


@dataclass(frozen=True)
class Denoise:
    """Score-based self-denoising after sampling (`tarflow.denoise`): one Tweedie step
    x + multiplier * noise_std^2 * grad log p(x | y), then clipping to [-1, 1]. `multiplier` 0 is
    off; `noise_std` is the model's training noise (null: read from the checkpoint)."""

    multiplier: float = 0.0
    noise_std: float | None = None

    __pydantic_config__ = STRICT_FIELDS

    def __post_init__(self):
        check_finite(self.multiplier, "multiplier", error=SpecError)
        check_finite(self.noise_std, "noise_std", optional=True, error=SpecError)

    @property
    def active(self) -> bool:
        return self.multiplier > 0


MAX_BATCH = 65_536  # a batch's noise, activations and KV caches are allocated at once: a bound before any of it
Labels = Union[Literal["uniform", "none"], tuple[int, ...], None]


@dataclass(frozen=True)
class SamplingSpec:
    """How a run samples; see the module docstring. `batch_size` is the batch a plan is profiled,
    certified and run at (another batch size changes samples only within floating-point tolerance)."""

    seed: int = 0
    labels: Labels = None
    guidance: Guidance = field(default_factory=Guidance)
    denoise: Denoise = field(default_factory=Denoise)
    batch_size: int = 16
    autocast: Literal["fp32", "bf16", "fp16"] = "fp32"

    __pydantic_config__ = STRICT_FIELDS

    def __post_init__(self):
        check_int(self.seed, "seed", low=0, error=SpecError)
        check_int(self.batch_size, "batch_size", high=MAX_BATCH, error=SpecError)
        if self.autocast not in AUTOCAST_DTYPES:
            raise SpecError(f"allowed values are {', '.join(AUTOCAST_DTYPES)}", "autocast", self.autocast)
        if isinstance(self.labels, list):
            object.__setattr__(self, "labels", tuple(self.labels))
        if isinstance(self.labels, tuple):
            if not self.labels:
                raise SpecError("give at least one class id, or 'uniform' / 'none'", "labels", [])
            bad = [y for y in self.labels if isinstance(y, bool) or not isinstance(y, int) or y < -1]
            if bad:
                raise SpecError(f"class ids are integers >= 0 (-1: unconditional), got {bad[0]!r}", "labels",
                                list(self.labels))
        elif self.labels not in ("uniform", "none", None):
            raise SpecError("allowed values are 'uniform', 'none', a list of class ids, or null", "labels",
                            self.labels)

    # ---- what the spec means for a model -----------------------------------------------------------------

    def for_model(self, num_classes: int, provenance: dict | None = None) -> "SamplingSpec":
        """This spec made concrete for a model: the label policy chosen and checked against its
        classes, the denoising noise read from its checkpoint. Raises SpecError where they do not fit."""
        labels = self.labels if self.labels is not None else ("uniform" if num_classes else "none")
        written = list(labels) if isinstance(labels, tuple) else labels  # as a config writes it
        if not num_classes and labels != "none" and not (isinstance(labels, tuple) and set(labels) == {-1}):
            raise SpecError("the model is unconditional (no classes); use 'none'", "labels", written)
        if isinstance(labels, tuple) and max(labels) >= num_classes:
            raise SpecError(f"class {max(labels)} out of range, the model has {num_classes} classes", "labels",
                            written)
        if self.guidance.active and not num_classes and self.guidance.attn_temp == 1:
            # an unconditional model is guided against its own attention at another temperature (the
            # reference's recipe); at temperature 1 both passes are the same and guidance does nothing
            raise SpecError("an unconditional model is guided only through its attention temperature; set "
                            "guidance.attn_temp != 1 (the paper's ImageNet-64 setting is 0.3), or scale 0",
                            ("guidance", "scale"), self.guidance.scale)
        denoise = self.denoise
        if denoise.active and denoise.noise_std is None:
            noise_std = (provenance or {}).get("noise_std")
            if noise_std is None:
                raise SpecError("the checkpoint does not record the training noise_std that denoising needs; give "
                                "denoise.noise_std (--noise-std)", ("denoise", "multiplier"), denoise.multiplier)
            denoise = Denoise(denoise.multiplier, float(noise_std))
        if not denoise.active:
            denoise = Denoise()  # noise_std means nothing without denoising: keep it out of the identity
        return dataclasses.replace(self, labels=labels, denoise=denoise)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES[self.autocast]

    def autocast_context(self, device_type: str):
        """The network's autocast for this spec on a device type (a no-op for fp32)."""
        dtype = self.autocast_dtype
        return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()

    def labels_for(self, ids, num_classes: int) -> torch.Tensor | None:
        """int64 labels of sample ids under the policy (None: unconditional, the mean class embedding)."""
        policy = self.labels if self.labels is not None else ("uniform" if num_classes else "none")
        if policy == "none" or not num_classes:
            return None
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        classes = torch.arange(num_classes) if policy == "uniform" else torch.tensor(policy, dtype=torch.long)
        return classes[ids % len(classes)]

    def sampling_map(self) -> dict:
        """The fields that define the map from noise to image (not which noise, labels or batching)."""
        return {"guidance": to_dict(self.guidance), "denoise": to_dict(self.denoise), "autocast": self.autocast}

    # ---- JSON ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_json(self) -> str:
        """Stable JSON (sorted keys, no whitespace): what stage keys and manifests hash."""
        return to_json(self, indent=None)

    def key(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def summary(self) -> str:
        g, d = self.guidance, self.denoise
        parts = [f"seed {self.seed}", f"labels {_show(self.labels)}", f"batch {self.batch_size}"]
        if g.active:
            parts.append(f"guidance {g.scale:g}{' annealed' if g.annealed else ''} on {g.what}"
                         + (f", attn_temp {g.attn_temp:g}" if g.attn_temp != 1 else ""))
        if d.active:
            parts.append(f"denoise x{d.multiplier:g} (noise {d.noise_std})")
        if self.autocast != "fp32":
            parts.append(self.autocast)
        return ", ".join(parts)


def _show(labels) -> str:
    return ",".join(map(str, labels)) if isinstance(labels, tuple) else str(labels)
