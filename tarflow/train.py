"""Train a TarFlow by maximum likelihood, as the reference trainer (apple/ml-tarflow) does.

Loss 0.5*mean(z^2) - mean(logdet) on data plus Gaussian noise of `noise_std` (the
noise level is part of the model: denoising after sampling undoes exactly it), label
dropout to the mean class embedding (what classifier-free guidance contrasts against),
AdamW(0.9, 0.95) with linear warm-up then cosine decay, and the prior variance tracked
by an EMA of z^2.

After every epoch two files are written atomically: the model in the project format
(`out`, safetensors + provenance) and a resume state next to it (`out` + ".state.pt":
weights, optimizer, scheduler and RNG state, plain tensors read back with
`weights_only=True`). Every random draw comes from one generator saved in that state,
so a resumed run continues bit for bit where the interrupted one stopped.
"""
from __future__ import annotations

import json
import math
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from .atomic import write_atomic
from .checkpoint import load_torch_data, save_checkpoint
from .data import ImageDataset, load_dataset
from .model import Model
from .schema import STRICT_FIELDS, JSONForm, SchemaError, check_finite, check_int, parse_json

STATE_SUFFIX = ".state.pt"
STATE_VERSION = 1
PRECISIONS = ("bf16", "fp32")


class TrainConfigError(SchemaError):
    """Training settings that cannot run; the message names the field."""


@dataclass(frozen=True)
class TrainConfig(JSONForm):
    dataset: str = "mnist5k"
    out: str = "runs/train/model.safetensors"
    image_size: int | None = None  # None: the dataset's own size
    in_channels: int | None = None  # None: the dataset's own channel count
    patch_size: int = 2
    width: int = 128
    num_blocks: int = 4
    layers_per_block: int = 2
    head_dim: int = 64
    conditional: bool = True
    noise_std: float = 0.1
    drop_label: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"  # cpu, cuda, cuda:N or mps
    precision: Literal[PRECISIONS] = "bf16"  # the network's autocast dtype, as the reference trains; "fp32": off

    __pydantic_config__ = STRICT_FIELDS
    json_name, json_error = "TrainConfig", TrainConfigError

    def __post_init__(self):
        for name in ("patch_size", "width", "num_blocks", "layers_per_block", "head_dim", "epochs", "batch_size"):
            check_int(getattr(self, name), name, error=TrainConfigError)
        for name in ("image_size", "in_channels"):
            check_int(getattr(self, name), name, optional=True, error=TrainConfigError)
        for name in ("noise_std", "weight_decay"):
            check_finite(getattr(self, name), name, error=TrainConfigError)
        check_finite(self.lr, "lr", strict=True, error=TrainConfigError)
        check_int(self.warmup_steps, "warmup_steps", low=0, error=TrainConfigError)
        if not 0 <= self.drop_label < 1:
            raise TrainConfigError("must be in [0, 1)", "drop_label", self.drop_label)
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"allowed values are {', '.join(PRECISIONS)}", "precision", self.precision)
        kind, _, index = self.device.partition(":")
        if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
            raise TrainConfigError("allowed values are cpu, cuda, cuda:N, mps", "device", self.device)
        if self.width % self.head_dim:
            raise TrainConfigError(f"must be a multiple of head_dim={self.head_dim}", "width", self.width)

    @property
    def state_path(self) -> Path:
        return Path(self.out + STATE_SUFFIX)


def git_revision() -> str | None:
    """The source revision that trained a model (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_model(cfg: TrainConfig, data: ImageDataset) -> Model:
    try:
        return Model(data.channels, data.image_size, cfg.patch_size, cfg.width, cfg.num_blocks, cfg.layers_per_block,
                     num_classes=data.num_classes if cfg.conditional else 0, head_dim=cfg.head_dim)
    except ValueError as e:  # e.g. a patch size that does not divide the images
        raise TrainConfigError(f"{data.name} ({data.image_size}x{data.image_size} images) cannot train this model: "
                               f"{e}") from None


def _autocast(device: torch.device, precision: str):
    # bf16 also pays on CPUs with AVX512-BF16: 8x faster training steps than fp32 measured here
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


@torch.no_grad()
def evaluate_bits_per_dim(model: Model, data: ImageDataset, noise_std: float, batch_size: int = 256,
                          seed: int = 0) -> float:
    """Mean bits/dim of `data` plus Gaussian noise of `noise_std` (the density the model was trained on)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(data), batch_size):
        x = data.images[start:start + batch_size]
        x = (x + noise_std * torch.randn(x.shape, generator=gen)).to(device)
        y = data.labels[start:start + batch_size].to(device) if model.config.num_classes else None
        z, logdet = model(x, y)
        total += model.bits_per_dim(z.float(), logdet.float()).sum().item()
    model.train(was_training)
    return total / len(data)


def load_train_state(path) -> dict:
    """Read a resume state written by `train` (plain tensors and numbers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume state not found: {path} (written next to the checkpoint by `train`)")
    state = load_torch_data(path, "training state", TrainConfigError)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise TrainConfigError(f"{path}: not a tarflow-gs training state of version {STATE_VERSION}")
    return state


def resume_config(checkpoint) -> TrainConfig:
    """The TrainConfig of an interrupted run, from the state stored next to its checkpoint (which may have moved)."""
    path = Path(str(checkpoint) + STATE_SUFFIX)
    stored = parse_json(load_train_state(path)["config"], f"{path}: its config", TrainConfigError)
    try:
        return TrainConfig.from_dict({**stored, "out": str(checkpoint)})
    except TrainConfigError as e:  # the file's fault, not an option's: named by the file
        raise TrainConfigError(f"{path}: {e}") from None


def _save_state(path: Path, state: dict) -> None:
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print) -> Path:
    """Train (or, with `resume`, continue) the run `cfg` describes; returns the final checkpoint path.

    With `resume` the state next to `cfg.out` must have been written with this same config."""
    device = torch.device(cfg.device)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    train_set = load_dataset(cfg.dataset, cfg.image_size, cfg.in_channels, split="train")
    test_set = load_dataset(cfg.dataset, cfg.image_size, cfg.in_channels, split="test")
    if len(train_set) < cfg.batch_size:
        raise TrainConfigError(f"TrainConfig.batch_size={cfg.batch_size} exceeds the {len(train_set)} training images")
    torch.manual_seed(cfg.seed)  # model initialisation
    model = build_model(cfg, train_set).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_set) // cfg.batch_size  # drop the ragged last batch: every step sees a full batch
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    start_epoch, seconds = 0, 0.0
    provenance = {"train_config": cfg.to_dict(), "noise_std": cfg.noise_std, "dataset": cfg.dataset,
                  "epochs": cfg.epochs, "git_revision": git_revision(), "num_train_images": len(train_set)}
    if resume:
        state = load_train_state(cfg.state_path)
        stored = TrainConfig.from_dict(parse_json(state["config"], f"{cfg.state_path}: its config", TrainConfigError))
        diff = {k: (v, getattr(cfg, k)) for k, v in stored.to_dict().items() if k != "out" and getattr(cfg, k) != v}
        if diff:
            raise TrainConfigError(f"{cfg.state_path}: cannot resume, config differs (stored, given): {diff}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["rng"])
        start_epoch, seconds = int(state["epoch"]), float(state["seconds"])
        provenance = parse_json(state["provenance"], f"{cfg.state_path}: its provenance", TrainConfigError)
        provenance["train_config"] = cfg.to_dict()
        log(f"resuming {cfg.out} after epoch {start_epoch}/{cfg.epochs}")
    num_dims = train_set.images[0].numel()
    images, labels = train_set.images, train_set.labels
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(train_set), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   mininterval=2.0, dynamic_ncols=True)
        loss_sum = 0.0
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = images[idx]
            x = x + cfg.noise_std * torch.randn(x.shape, generator=gen)
            y = None
            if model.config.num_classes:
                drop = torch.rand(len(idx), generator=gen) < cfg.drop_label
                y = torch.where(drop, -1, labels[idx]).to(device)  # -1: the mean class embedding
            with _autocast(device, cfg.precision):
                z, logdet = model(x.to(device), y)
            z, logdet = z.float(), logdet.float()
            loss = model.nll_loss(z, logdet)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, step {step + 1}: lower "
                                         f"TrainConfig.lr={cfg.lr} or raise warmup_steps; the last finished "
                                         f"epoch is kept in {cfg.out}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            model.update_prior(z)
            loss_sum += loss.item()
            bpd = model.bits_per_dim(z.detach(), logdet.detach()).mean().item()
            bar.set_postfix(loss=f"{loss.item():.4f}", bpd=f"{bpd:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        seconds += time.perf_counter() - t0
        provenance.update(epoch=epoch + 1, step=(epoch + 1) * steps_per_epoch, train_loss=loss_sum / steps_per_epoch,
                          train_seconds=round(seconds, 1))
        _save_state(cfg.state_path, {
            "version": STATE_VERSION, "config": json.dumps(cfg.to_dict()), "epoch": epoch + 1, "seconds": seconds,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": gen.get_state(), "provenance": json.dumps(provenance),
        })
        save_checkpoint(model, cfg.out, provenance)
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {provenance['train_loss']:.4f}, {seconds:.0f}s so far, "
            f"saved {cfg.out}")
    heldout = evaluate_bits_per_dim(model, test_set, cfg.noise_std)
    provenance.update(heldout_bits_per_dim=round(heldout, 4), num_heldout_images=len(test_set))
    save_checkpoint(model, cfg.out, provenance)
    log(f"held-out bits/dim ({len(test_set)} test images + noise {cfg.noise_std}): {heldout:.4f}  "
        f"[{num_dims} dims/image, {seconds:.0f}s training]")
    return Path(cfg.out)
