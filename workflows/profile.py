"""Profile stage: how each block of a model converges and what each solver costs, here.

One Ray task per block takes the block's true (z, x) pairs on a calibration batch
and records the paper's CRM and IGM, the passes every candidate solver needs to
reach each tolerance and the error each fixed iteration cap leaves (both against the
true solution), and the measured seconds per sequential step and per parallel pass
at the batch size the plan is for.
The scheduler (`workflows/schedule.py`) turns a profile into a plan.

Calibration: training images pushed through `encode` give every block's true
input and output (the paper's recipe); without data, the model's own sequential
samples from seeded noise do. Under guidance the sampling map differs from the
encoder, so the true pairs then come from guided sequential sampling of the same noise.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

import torch

from tarflow import Model, load_dataset, model_hash
from tarflow.metrics import INITIAL_GUESSES, crm, crm_shares, igm
from tarflow.noise import sample_noise
from tarflow.plan import BlockPlan
from tarflow.solvers import SOLVERS, BlockRun, BlockStats, Guidance

PROFILE_VERSION = 1
# stopping tolerances and iteration caps tried per setting: a fine ladder, because the scheduler
# can only spend the error budget in the steps the profile measured
DEFAULT_TOLS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5)
DEFAULT_CAPS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512)
DEFAULT_WINDOWS = (32, 64)
NO_DATA = "samples"  # calibration source when no data is given: the model's own sequential samples
DIVERGENCE_BOUND = 1e4
PASSES_TIMED = 3


class ProfileError(ValueError):
    """An invalid profile, or a profile that does not fit the model it is used with."""


@dataclass
class ConvergenceRun:
    """One solver setting on the calibration batch, run in chunks of `batch_size` rows.

    Stopping rule: at `tol` (max abs change of an iteration), or after exactly `cap`
    Jacobi iterations per segment when `cap` is set (then `tol` is 0)."""

    solver: str
    segment_len: int
    init: str
    tol: float
    passes: float  # parallel passes (network calls) per chunk, mean over chunks
    max_iters: int  # most Jacobi iterations any segment needed
    error: float  # max abs deviation from the true block solution, all rows
    seconds: float  # measured wall time per chunk, mean
    cap: int | None = None  # iteration cap per segment (BlockPlan.max_iters); None: until `tol`


@dataclass
class BlockProfile:
    block: int  # forward index: model.blocks[block]
    crm: float
    crm_share: float
    crm_terms: dict  # mean_alpha_x, scale_weight, shift_weight
    igm: dict  # init name -> IGM
    sequential_step_seconds: float
    sequential_error: float  # exact sampling vs the true solution: the floating-point floor
    pass_seconds: dict  # str(segment length) -> seconds per parallel pass over that many tokens
    convergence: list[ConvergenceRun]


@dataclass
class GuidanceProfile:
    guidance: float
    blocks: list[BlockProfile]  # by forward index


@dataclass
class Profile:
    model_hash: str
    checkpoint: str | None
    num_blocks: int
    num_tokens: int
    token_dim: int
    batch_size: int
    calibration: dict  # source, num_images, seed
    device: str
    threads: int
    torch_version: str
    tols: list[float]
    cases: list[GuidanceProfile]
    seconds: float = 0.0
    caps: list[int] = field(default_factory=list)
    version: int = PROFILE_VERSION

    def case(self, guidance: float) -> GuidanceProfile:
        for c in self.cases:
            if math.isclose(c.guidance, guidance):
                return c
        raise ProfileError(f"the profile has no guidance={guidance}; it has {[c.guidance for c in self.cases]}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.validate().to_json() + "\n")
        return path

    @classmethod
    def load(cls, path) -> "Profile":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"profile not found: {path}")
        try:
            return cls.from_json(path.read_text())
        except ProfileError as e:
            raise ProfileError(f"{path}: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"profile is not valid JSON: {e}") from e
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d) -> "Profile":
        top = _fields(d, cls, "profile")
        cases = []
        for i, c in enumerate(_list(top.get("cases"), "profile.cases")):
            c = _fields(c, GuidanceProfile, f"profile.cases[{i}]")
            blocks = []
            for j, b in enumerate(_list(c.get("blocks"), f"profile.cases[{i}].blocks")):
                where = f"profile.cases[{i}].blocks[{j}]"
                b = _fields(b, BlockProfile, where)
                runs = [ConvergenceRun(**_fields(r, ConvergenceRun, f"{where}.convergence[{k}]"))
                        for k, r in enumerate(_list(b.get("convergence"), f"{where}.convergence"))]
                blocks.append(BlockProfile(**{**b, "convergence": runs}))
            cases.append(GuidanceProfile(**{**c, "blocks": blocks}))
        return cls(**{**top, "cases": cases}).validate()

    def validate(self) -> "Profile":
        if self.version != PROFILE_VERSION:
            raise ProfileError(f"profile.version={self.version!r}: this build reads version {PROFILE_VERSION}")
        for name, low in (("num_blocks", 1), ("num_tokens", 2), ("token_dim", 1), ("batch_size", 1), ("threads", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ProfileError(f"profile.{name}={v!r}: must be an integer >= {low}")
        if not isinstance(self.caps, list) or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                                  for c in self.caps):
            raise ProfileError(f"profile.caps={self.caps!r}: must be a list of positive integers")
        if not self.cases:
            raise ProfileError("profile.cases is empty: profile at least one guidance scale")
        for i, case in enumerate(self.cases):
            if len(case.blocks) != self.num_blocks:
                raise ProfileError(f"profile.cases[{i}] has {len(case.blocks)} blocks, profile.num_blocks="
                                   f"{self.num_blocks}")
            for j, b in enumerate(case.blocks):
                _check_block(b, j, self.num_tokens, f"profile.cases[{i}].blocks[{j}]")
        return self


def _fields(d, cls, where: str) -> dict:
    if not isinstance(d, dict):
        raise ProfileError(f"{where} must be a JSON object")
    names = set(cls.__dataclass_fields__)
    unknown = sorted(set(d) - names)
    if unknown:
        raise ProfileError(f"{where} has unknown field(s) {unknown}; allowed: {sorted(names)}")
    required = {f.name for f in cls.__dataclass_fields__.values()
                if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(d))
    if missing:
        raise ProfileError(f"{where} lacks required field(s) {missing}")
    return d


def _list(v, where: str) -> list:
    if not isinstance(v, list):
        raise ProfileError(f"{where} must be a list")
    return v


def _number(v, where: str, minimum: float = 0.0) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < minimum:
        raise ProfileError(f"{where}={v!r}: must be a finite number >= {minimum}")


def _check_block(b: BlockProfile, index: int, num_tokens: int, where: str) -> None:
    if b.block != index:
        raise ProfileError(f"{where}.block={b.block!r}: blocks must be listed in forward order, expected {index}")
    for name in ("crm", "crm_share", "sequential_step_seconds", "sequential_error"):
        _number(getattr(b, name), f"{where}.{name}")
    if set(b.igm) != set(INITIAL_GUESSES):
        raise ProfileError(f"{where}.igm has keys {sorted(b.igm)}; expected {list(INITIAL_GUESSES)}")
    for k, v in b.igm.items():
        _number(v, f"{where}.igm.{k}")
    for k, v in b.pass_seconds.items():
        if not k.isdigit() or not 1 <= int(k) <= num_tokens - 1:
            raise ProfileError(f"{where}.pass_seconds key {k!r}: must be a segment length in 1..{num_tokens - 1}")
        _number(v, f"{where}.pass_seconds[{k}]")
    for k, r in enumerate(b.convergence):
        w = f"{where}.convergence[{k}]"
        if r.solver not in SOLVERS or r.solver == "sequential":
            raise ProfileError(f"{w}.solver={r.solver!r}: allowed values are "
                               f"{', '.join(s for s in SOLVERS if s != 'sequential')}")
        if r.init not in INITIAL_GUESSES:
            raise ProfileError(f"{w}.init={r.init!r}: allowed values are {', '.join(INITIAL_GUESSES)}")
        if str(r.segment_len) not in b.pass_seconds:
            raise ProfileError(f"{w}.segment_len={r.segment_len!r}: no measured pass cost for it in pass_seconds")
        for name in ("tol", "passes", "error", "seconds"):
            _number(getattr(r, name), f"{w}.{name}")
        if isinstance(r.max_iters, bool) or not isinstance(r.max_iters, int) or r.max_iters < 1:
            raise ProfileError(f"{w}.max_iters={r.max_iters!r}: must be a positive integer")
        if r.cap is not None:
            if isinstance(r.cap, bool) or not isinstance(r.cap, int) or r.cap < 1:
                raise ProfileError(f"{w}.cap={r.cap!r}: must be a positive integer or null")
            if r.solver == "sliding":
                raise ProfileError(f"{w}.cap={r.cap!r}: the sliding solver takes no iteration cap; use null")


# --- calibration ---------------------------------------------------------------------------------

@dataclass
class Calibration:
    """Noise (B, T, D) in the sampler's input convention (unit Gaussian scale), labels or None,
    and, for data, the images it encodes."""

    noise: torch.Tensor
    labels: torch.Tensor | None
    images: torch.Tensor | None
    source: str
    seed: int


@torch.inference_mode()
def calibration_batch(model: Model, data: str | None, num_images: int, seed: int = 0) -> Calibration:
    """The calibration noise: encoded training images, or seeded Gaussian noise (no data)."""
    T, D = model.num_tokens, model.token_dim
    g = torch.Generator().manual_seed(seed)
    num_classes = model.config.num_classes
    if data in (None, NO_DATA):
        labels = torch.randint(num_classes, (num_images,), generator=g) if num_classes else None
        return Calibration(sample_noise(seed, range(num_images), T, D), labels, None, NO_DATA, seed)
    ds = load_dataset(data, image_size=model.config.img_size, channels=model.config.in_channels, split="train")
    if len(ds.images) < num_images:
        raise ProfileError(f"calibration wants {num_images} images but {data!r} has {len(ds.images)} (train split)")
    rows = torch.randperm(len(ds.images), generator=g)[:num_images]
    images = ds.images[rows]
    labels = ds.labels[rows] if num_classes else None
    z, _ = model.encode(images, labels)
    return Calibration(z / model.var.sqrt(), labels, images, str(data), seed)


@torch.inference_mode()
def block_pairs(model: Model, calib: Calibration, guidance: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per forward block i, its true (z_i, x_i): the block maps x_i to z_i when encoding."""
    pairs: list = [None] * len(model.blocks)
    if calib.images is not None and guidance == 0:
        x = model.patchify(calib.images)
        for i, block in enumerate(model.blocks):
            z, _ = block(x, calib.labels)
            pairs[i] = (z, x)
            x = z
        return pairs
    z = calib.noise * model.var.sqrt()
    for i in reversed(range(len(model.blocks))):
        x = exact_solve(model.blocks[i], z, calib.labels, Guidance(guidance))
        if not bool(torch.isfinite(x).all()):
            raise ProfileError(f"sequential sampling overflows in block {i} on the calibration noise "
                               f"(guidance={guidance}): the model cannot be profiled with these settings")
        pairs[i] = (z, x)
        z = x
    return pairs


@torch.inference_mode()
def exact_solve(block, z, labels, guidance: Guidance) -> torch.Tensor:
    run = BlockRun(block, z, labels, guidance)
    stats = BlockStats(0, "sequential", 1)
    return block.permute(SOLVERS["sequential"](run, BlockPlan(), stats, DIVERGENCE_BOUND))


# --- one block -----------------------------------------------------------------------------------

def default_segment_lens(num_tokens: int) -> list[int]:
    """Plain Jacobi (T-1) and 4 and 8 equal segments, as the paper's GS counts."""
    lens = [-(-(num_tokens - 1) // k) for k in (1, 4, 8)]
    return sorted({n for n in lens if n >= 2}, reverse=True)


def solver_options(num_tokens: int, segment_lens, windows) -> list[tuple[str, int]]:
    opts = [("jacobi" if L == num_tokens - 1 else "gs_jacobi", L) for L in segment_lens]
    return opts + [("sliding", W) for W in windows if 2 <= W < num_tokens - 1]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _solve(block, z, labels, guidance, bp: BlockPlan):
    """(x, stats, seconds) of one block solve, as `sample` would run it."""
    run = BlockRun(block, z, labels, guidance)
    stats = BlockStats(0, bp.solver, bp.segment_length(run.num_tokens))
    _sync(z.device)
    t0 = time.perf_counter()
    x = SOLVERS[bp.solver](run, bp, stats, DIVERGENCE_BOUND)
    _sync(z.device)
    return block.permute(x), stats, time.perf_counter() - t0


def _timed(block, z, labels, guidance, bp: BlockPlan, repeats: int) -> float:
    """Best-of-`repeats` seconds per pass (network call) of `bp`."""
    _, stats, _ = _solve(block, z, labels, guidance, bp)  # also the warm-up: allocator, kernels
    return min(_solve(block, z, labels, guidance, bp)[2] for _ in range(repeats)) / stats.passes


def _plan_for(solver: str, L: int, init: str, tol: float, max_iters=None) -> BlockPlan:
    return BlockPlan(solver, None if solver == "jacobi" else L, max_iters, tol, init)


@torch.inference_mode()
def profile_block(block, index: int, pairs_by_case: list, labels, batch_size: int, segment_lens, windows,
                  tols, repeats: int = 3, caps=DEFAULT_CAPS) -> list[BlockProfile]:
    """Everything the scheduler needs about one block, for each guidance case.

    Settings that are predictably slower than sequential on this device are not run
    (or not run at tighter tolerances): the scheduler could never choose them.
    `pairs_by_case`: [(guidance, z, x)] with z, x (N, T, D) the block's true pairs on the
    calibration rows; solves run in chunks of `batch_size` rows (the plan's batch size),
    so passes and seconds are what a batch of that size costs."""
    out = []
    for guidance, z, x in pairs_by_case:
        g = Guidance(guidance)
        T = z.shape[1]
        chunks = [slice(s, s + batch_size) for s in range(0, z.shape[0], batch_size)]
        lab = (lambda c: None if labels is None else labels[c])
        first = chunks[0]
        seq_seconds = _timed(block, z[first], lab(first), g, BlockPlan(), repeats)
        seq_error = max((_solve(block, z[c], lab(c), g, BlockPlan())[0] - x[c]).abs().max().item() for c in chunks)
        options = solver_options(T, segment_lens, windows)
        pass_seconds = {}
        for L in sorted({L for _, L in options}):
            # a few passes per segment (tol 0 runs them all) average out timer and scheduler noise
            bp = _plan_for("jacobi" if L == T - 1 else "gs_jacobi", L, "z", 0.0, max_iters=PASSES_TIMED)
            pass_seconds[str(L)] = _timed(block, z[first], lab(first), g, bp, repeats)
        runs = []
        sequential_block = (T - 1) * seq_seconds

        def measure(solver, L, init, tol, cap=None) -> ConvergenceRun:
            passes, iters, err, secs = [], [], 0.0, []
            for c in chunks:
                xs, stats, s = _solve(block, z[c], lab(c), g, _plan_for(solver, L, init, tol, cap))
                passes.append(stats.passes)
                iters.append(max(stats.iterations))
                err = max(err, (xs - x[c]).abs().max().item())
                secs.append(s)
            run = ConvergenceRun(solver, L, init, tol, sum(passes) / len(passes), max(iters), err,
                                 sum(secs) / len(secs), cap)
            runs.append(run)
            return run

        for solver, L in options:
            pass_cost = pass_seconds[str(L)]
            if -(-(T - 1) // L) * pass_cost >= sequential_block:
                continue  # even one pass per segment is slower than sequential here: never chosen
            for init in INITIAL_GUESSES:
                for tol in sorted(tols, reverse=True):  # loosest first: tighter ones only take longer
                    if measure(solver, L, init, tol).passes * pass_cost >= sequential_block:
                        break
                if solver == "sliding":
                    continue
                # fixed iteration counts: no pass is spent detecting convergence; caps >= L are exact
                # Jacobi, which the tightest tolerance already covers for fewer passes
                for cap in sorted(c for c in caps if c < L):
                    r = measure(solver, L, init, 0.0, cap)
                    if r.passes * pass_cost >= sequential_block or r.error <= min(tols, default=0.0):
                        break
        c = crm(block, x, labels)
        out.append(BlockProfile(index, c.value, 0.0, {"mean_alpha_x": c.mean_alpha_x, "scale_weight": c.scale_weight,
                                                      "shift_weight": c.shift_weight},
                                {init: igm(block, z, x, init, labels, g) for init in INITIAL_GUESSES},
                                seq_seconds, seq_error, pass_seconds, runs))
    return out


# --- the stage -----------------------------------------------------------------------------------

def _profile_block_task(model, index, pairs_by_case, labels, batch_size, segment_lens, windows, tols, caps,
                        repeats, device, threads):
    torch.set_num_threads(threads)
    dev = torch.device(device)
    block = model.blocks[index].to(dev)
    moved = [(g, z.to(dev), x.to(dev)) for g, z, x in pairs_by_case]
    return profile_block(block, index, moved, None if labels is None else labels.to(dev), batch_size, segment_lens,
                         windows, tols, repeats, caps)


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {threads} threads)"


def profile_model(model: Model, data: str | None = None, num_images: int = 8, batch_size: int = 1,
                  guidance: list[float] = (0.0,), device: str = "cpu", seed: int = 0,
                  segment_lens: list[int] | None = None, windows=DEFAULT_WINDOWS, tols=DEFAULT_TOLS, caps=DEFAULT_CAPS,
                  repeats: int = 3, num_cpus: int | None = None, checkpoint: str | None = None) -> Profile:
    """Profile every block of `model` in Ray tasks, one per block (Ray must be initialised).

    `num_images` calibration rows are solved in chunks of `batch_size`, the batch the plan
    is for (rounded up to whole chunks). Each task takes `num_cpus` CPUs (default: as many
    threads as this process uses, so its timings match local sampling) or one GPU."""
    import ray

    if batch_size < 1 or num_images < 1:
        raise ProfileError(f"batch_size={batch_size}, num_images={num_images}: both must be >= 1")
    num_images = -(-num_images // batch_size) * batch_size
    start = time.perf_counter()
    model = model.eval().cpu()
    T = model.num_tokens
    segment_lens = sorted(set(segment_lens or default_segment_lens(T)), reverse=True)
    bad = [L for L in segment_lens if not 2 <= L <= T - 1]
    if bad:
        raise ProfileError(f"segment_lens {bad}: each must be in 2..{T - 1} (T-1 is plain Jacobi)")
    calib = calibration_batch(model, data, num_images, seed)
    pairs = {g: block_pairs(model, calib, g) for g in guidance}
    threads = num_cpus or torch.get_num_threads()
    dev = torch.device(device)
    resources = {"num_gpus": 1, "num_cpus": 1} if dev.type == "cuda" else {"num_cpus": threads}
    task = ray.remote(**resources)(_profile_block_task)
    model_ref = ray.put(model)
    refs = [task.remote(model_ref, i, [(g, *pairs[g][i]) for g in guidance], calib.labels, batch_size,
                        segment_lens, list(windows), list(tols), list(caps), repeats, device, threads)
            for i in range(len(model.blocks))]
    per_block = ray.get(refs)
    cases = []
    for k, g in enumerate(guidance):
        blocks = [per_block[i][k] for i in range(len(model.blocks))]
        for b, share in zip(blocks, crm_shares([b.crm for b in blocks])):
            b.crm_share = share
        cases.append(GuidanceProfile(float(g), blocks))
    return Profile(model_hash(model), checkpoint, len(model.blocks), T, model.token_dim, batch_size,
                   {"source": calib.source, "num_images": num_images, "seed": seed}, device_name(dev, threads),
                   threads, torch.__version__, [float(t) for t in tols], cases,
                   time.perf_counter() - start, caps=[int(c) for c in caps]).validate()
