"""Checkpoint I/O: raw apple/ml-tarflow `.pth` state dicts and the project's own format.

The project's format is one safetensors file whose string metadata carries the model
config and provenance as JSON. Raw `.pth` files are read with `weights_only=True`
(`load_torch_data`, which every torch file a user gives goes through): checkpoints are data,
never code, and a TorchScript program is refused where one is given.

A checkpoint is named by a reference: `demo` (the shipped demo model), a local path, a
`file://` URI, or any other URI an installed fsspec filesystem reads (s3://, gs://, ...;
copied once into a local cache; `workflows` gives those clients their deadlines). `ModelRef` is that reference plus what a raw file needs
to be read, so a profile or plan can reload its model from what it recorded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from .atomic import write_atomic
from .model import Model, ModelConfig
from .schema import STRICT_FIELDS, SchemaError, check_int, input_file, parse_json

FORMAT_NAME = "tarflow-gs"
FORMAT_VERSION = 1


class CheckpointError(SchemaError):
    """A checkpoint that cannot be read or does not match the model it claims to be, or a `ModelRef` that
    names none."""


def _is_torchscript(path: Path) -> bool:
    # what torch.load itself looks for before handing an archive to torch.jit.load
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def load_torch_data(path, what: str, error: type[Exception] = CheckpointError):
    """A `torch.save`d file as data: tensors, numbers, strings and containers of them
    (`torch.load(weights_only=True)`). A pickle that names any other Python object could run it, and a
    TorchScript archive is a program: both are refused with `error` naming the file, as is anything
    unreadable. A missing path is FileNotFoundError, a directory IsADirectoryError."""
    path = input_file(path, what)
    if _is_torchscript(path):
        raise error(f"{path} is a TorchScript program, i.e. code: refused as {what}, which must be data "
                    "(tensors only)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise error(f"{path} holds a Python object ({found.group(1)}), not only tensors: refused as {what}, "
                        "which is read as data (torch.load with weights_only=True), never run as code") from None
        detail = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise error(f"{path} is not a readable {what} ({type(e).__name__}: {' '.join(detail.split())})") from None


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def infer_config(state_dict: dict, in_channels: int = 3, head_dim: int = 64) -> ModelConfig:
    """Recover the architecture of a raw apple/ml-tarflow state dict from its shapes."""
    if "var" not in state_dict:
        raise CheckpointError("not a TarFlow state dict: key 'var' (the prior variance, shape (T, D)) is missing")
    if state_dict["var"].dim() != 2:
        raise CheckpointError(f"key 'var' has shape {tuple(state_dict['var'].shape)}, not (T, D)")
    T, D = state_dict["var"].shape
    block_ids = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not block_ids or block_ids != list(range(len(block_ids))):
        raise CheckpointError(f"blocks must be numbered 0..N-1, found block indices {block_ids[:10]}")
    layer_ids = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.0\.attn_blocks\.(\d+)\.", k))})
    if not layer_ids:
        raise CheckpointError("no 'blocks.0.attn_blocks.{j}.*' keys: cannot infer layers_per_block")
    if "blocks.0.pos_embed" not in state_dict:
        raise CheckpointError("key 'blocks.0.pos_embed' is missing: cannot infer the width")
    channels = state_dict["blocks.0.pos_embed"].shape[1]
    class_embed = state_dict.get("blocks.0.class_embed")
    num_classes = class_embed.shape[0] if class_embed is not None else 0
    if "blocks.0.proj_out.weight" not in state_dict:
        raise CheckpointError("key 'blocks.0.proj_out.weight' is missing: cannot infer the output form")
    out_rows = state_dict["blocks.0.proj_out.weight"].shape[0]
    if out_rows not in (D, 2 * D):
        raise CheckpointError(f"'blocks.0.proj_out.weight' has {out_rows} rows; expected 2*D={2 * D} (nvp) or D={D}")
    if D % in_channels:
        raise CheckpointError(f"token dim D={D} (from 'var') is not divisible by in_channels={in_channels}: give the "
                              "image channels of this raw checkpoint (--in-channels, model.in_channels)")
    patch = math.isqrt(D // in_channels)
    side = math.isqrt(T)
    if patch * patch * in_channels != D or side * side != T:
        raise CheckpointError(
            f"'var' has shape ({T}, {D}): with in_channels={in_channels} this is not a square image of square patches; "
            "give the image channels of this raw checkpoint (--in-channels, model.in_channels)")
    return ModelConfig(in_channels, side * patch, patch, channels, len(block_ids), len(layer_ids),
                       num_classes, out_rows == 2 * D, head_dim).validate()


def claimed_config(claimed, state_dict: dict, where: str) -> ModelConfig:
    """The config a checkpoint's metadata claims, if its tensors are that architecture; else CheckpointError.
    Every dimension is checked against the tensors present (`infer_config`) before anything is built, so
    a file's claims cannot size an allocation or a loop: 10**7 blocks or 2**30 channels over a small
    file's tensors are a message, not minutes of building."""
    if not isinstance(claimed, dict):
        raise CheckpointError(f"{where} is {type(claimed).__name__}, not an object")
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(claimed) - set(names))
    if unknown:
        raise CheckpointError(f"{where} has unknown field(s) {', '.join(unknown)}; a model config has {', '.join(names)}")
    for f in dataclasses.fields(ModelConfig):
        if f.name not in claimed and f.default is dataclasses.MISSING:
            raise CheckpointError(f"{where} lacks {f.name}")
        value = claimed.get(f.name, f.default)
        kind = bool if f.name == "nvp" else int
        if type(value) is not kind:
            raise CheckpointError(f"{where}: {f.name}={value!r}, not {'true or false' if kind is bool else 'an integer'}")
    try:
        config = ModelConfig(**claimed).validate()
        found = infer_config(state_dict, config.in_channels, config.head_dim)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    differ = [f"{name}={getattr(config, name)} (the tensors are {getattr(found, name)})"
              for name in names if getattr(config, name) != getattr(found, name)]
    if differ:
        raise CheckpointError(f"{where} does not match the weights in the file: {'; '.join(differ)}")
    return config


def check_state_dict(model: Model, state_dict: dict) -> None:
    """Raise a CheckpointError naming the first key or shape that disagrees with the model."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        raise CheckpointError(f"checkpoint lacks key '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected in all)")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise CheckpointError(f"key '{k}' has shape {tuple(state_dict[k].shape)}, model expects {tuple(v.shape)}")


def _build(config: ModelConfig, state_dict: dict) -> Model:
    # built on the meta device and given the loaded tensors: no random initialisation of weights that
    # are then overwritten, and no second copy of a model of hundreds of millions of parameters
    with torch.device("meta"):
        model = Model.from_config(config)
    check_state_dict(model, state_dict)
    # fresh, aligned, contiguous memory per tensor, as an initialised module's: the loaded buffers can sit
    # at any offset of the file, and vectorised kernels round differently on differently aligned data
    owned = {}
    for k in list(state_dict):
        v = state_dict.pop(k)
        owned[k] = torch.empty_like(v, memory_format=torch.contiguous_format).copy_(v)
    model.load_state_dict(owned, strict=True, assign=True)
    return model.eval()


CACHE_DIR = Path(os.environ.get("TARFLOW_GS_CACHE", "~/.cache/tarflow-gs")).expanduser() / "checkpoints"


def resolve_checkpoint(ref) -> Path:
    """The local file a checkpoint reference names (see the module docstring)."""
    ref = str(ref)
    if ref == "demo":
        from .demo import demo_checkpoint

        return demo_checkpoint()
    if ref.startswith("file://"):
        return Path(ref.removeprefix("file://"))
    if "://" not in ref:
        return Path(ref).expanduser()
    try:
        import fsspec
    except ImportError:
        raise CheckpointError(f"checkpoint {ref}: reading a URI needs the store's client (pip install "
                              "'tarflow-gs[s3]' or 'tarflow-gs[gcs]'), or copy the file to a local path") from None
    local = CACHE_DIR / hashlib.sha256(ref.encode()).hexdigest()[:16] / ref.rstrip("/").rsplit("/", 1)[-1]
    if not local.is_file():
        def copy(tmp: Path) -> None:
            with fsspec.open(ref, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)

        try:
            write_atomic(local, copy)
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint not found: {ref}") from None
        except Exception as e:  # the store's client raises its own types (no credentials, timeouts, ...)
            raise CheckpointError(f"checkpoint {ref}: cannot read it ({type(e).__name__}: {e}); check the store's "
                                  "credentials and endpoint") from None
    return local


def load_checkpoint(ref, in_channels: int = 3, head_dim: int = 64, with_metadata: bool = False):
    """Load a model from a raw apple `.pth` state dict or a tarflow-gs safetensors file.

    `ref` is a checkpoint reference (`demo`, a path or a URI). `in_channels` only matters for
    raw files (it resolves patch and image size). With `with_metadata=True` returns (model,
    metadata dict) where metadata holds the provenance of the project format ({} for raw files)."""
    path = input_file(resolve_checkpoint(ref), "checkpoint")
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state_dict = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from e
        if meta.get("format") != FORMAT_NAME or "config" not in meta:
            raise CheckpointError(f"{path}: safetensors file without tarflow-gs metadata (format/config)")
        if meta.get("version") not in {str(v) for v in range(1, FORMAT_VERSION + 1)}:
            raise CheckpointError(f"{path}: format version {meta.get('version')!r}; this build reads 1 to "
                                  f"{FORMAT_VERSION}")
        config = claimed_config(parse_json(meta["config"], f"{path}: the config in its metadata", CheckpointError),
                                state_dict, f"{path}: the config in its metadata")
        model = _build(config, state_dict)
        provenance = parse_json(meta.get("provenance", "{}"), f"{path}: the provenance in its metadata",
                                CheckpointError)
        if not isinstance(provenance, dict):
            raise CheckpointError(f"{path}: the provenance in its metadata is {type(provenance).__name__}, "
                                  "not an object")
    else:
        state_dict = load_torch_data(path, "checkpoint")
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise CheckpointError(f"{path}: expected a flat state dict of tensors")
        model = _build(infer_config(state_dict, in_channels, head_dim), state_dict)
        provenance = {}
    return (model, provenance) if with_metadata else model


def save_checkpoint(model: Model, path, provenance: dict | None = None) -> Path:
    """Write the project format: safetensors weights + JSON config and provenance in the header."""
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "config": json.dumps(model.config.to_dict()),
        "provenance": json.dumps(provenance or {}, default=str),
    }
    return write_atomic(path, lambda tmp: save_file(state_dict, str(tmp), metadata=meta))


def model_hash(model: Model) -> str:
    """Content hash of config and weights: names a model independently of its file."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ModelRef:
    """What reloads a model: the checkpoint reference and, for raw `.pth` files, the image channels."""

    checkpoint: str = "demo"
    in_channels: int = 3

    __pydantic_config__ = STRICT_FIELDS

    def __post_init__(self):
        if not isinstance(self.checkpoint, str) or not self.checkpoint.strip():
            raise CheckpointError("give a path, a URI, or 'demo'", "checkpoint", self.checkpoint)
        check_int(self.in_channels, "in_channels", error=CheckpointError)

    def load(self, with_metadata: bool = False):
        return load_checkpoint(self.checkpoint, self.in_channels, with_metadata=with_metadata)
