"""Sampling plans: which solver inverts each block, and how.

A plan is indexed by *forward* block index: `plan.blocks[i]` drives `model.blocks[i]`.
Sampling runs the blocks in reverse, so `plan.blocks[-1]` is the block sampled first.

JSON schema (version 1)::

    {"version": 1, "num_blocks": 4, "num_tokens": 196,
     "divergence_bound": 10000.0, "model_hash": "ab12..." | null, "name": "auto",
     "blocks": [{"solver": "gs_jacobi", "segment_len": 32, "max_iters": null,
                 "tol": 1e-4, "init": "z"}, ...],
     "evidence": {...free-form, written by the scheduler...}}

Solvers: `sequential` (one token per step, exact), `jacobi` (all T-1 unknown tokens
at once), `gs_jacobi` (segments of `segment_len` tokens in order, Jacobi inside),
`sliding` (Jacobi over a window of `segment_len` tokens that starts at the first
unconverged token; no `max_iters`). `max_iters` caps Jacobi iterations per segment;
null means the segment length, where Jacobi is exact. Tokens are numbered in the block's own (permuted) order;
token 0 never changes, so segments tile tokens 1..T-1.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLAN_VERSION = 1
SOLVER_NAMES = ("sequential", "jacobi", "gs_jacobi", "sliding")
SEGMENTED_SOLVERS = ("gs_jacobi", "sliding")  # take a segment_len
INIT_NAMES = ("z", "zeros")


class PlanError(ValueError):
    """An invalid plan, or a plan that does not fit the model."""


@dataclass
class BlockPlan:
    solver: str = "sequential"
    segment_len: int | None = None
    max_iters: int | None = None
    tol: float = 1e-4
    init: str = "z"

    def validate(self, num_tokens: int, where: str = "block") -> "BlockPlan":
        if self.solver not in SOLVER_NAMES:
            raise PlanError(f"{where}.solver={self.solver!r}: allowed values are {', '.join(SOLVER_NAMES)}")
        if self.init not in INIT_NAMES:
            raise PlanError(f"{where}.init={self.init!r}: allowed values are {', '.join(INIT_NAMES)}")
        if self.solver in SEGMENTED_SOLVERS:
            if not isinstance(self.segment_len, int) or not 1 <= self.segment_len <= num_tokens - 1:
                raise PlanError(f"{where}.segment_len={self.segment_len!r}: {self.solver} needs an integer in "
                                f"[1, {num_tokens - 1}] (T-1 for T={num_tokens} tokens)")
        elif self.segment_len is not None:
            raise PlanError(f"{where}.segment_len={self.segment_len!r}: only {' and '.join(SEGMENTED_SOLVERS)} "
                            "take a segment length")
        if self.solver == "sliding" and self.max_iters is not None:
            raise PlanError(f"{where}.max_iters={self.max_iters!r}: the sliding solver takes no iteration cap "
                            "(it advances at least one token per pass); use null")
        if self.max_iters is not None and (not isinstance(self.max_iters, int) or self.max_iters < 1):
            raise PlanError(f"{where}.max_iters={self.max_iters!r}: must be a positive integer or null")
        if not isinstance(self.tol, (int, float)) or not math.isfinite(self.tol) or self.tol < 0:
            raise PlanError(f"{where}.tol={self.tol!r}: must be a finite number >= 0")
        return self

    def segment_length(self, num_tokens: int) -> int:
        """Tokens solved together: 1 for sequential, all T-1 unknown tokens for jacobi."""
        return {"sequential": 1, "jacobi": num_tokens - 1}.get(self.solver, self.segment_len)

    def segments(self, num_tokens: int) -> list[tuple[int, int]]:
        L = self.segment_length(num_tokens)
        return [(s, min(s + L, num_tokens)) for s in range(1, num_tokens, L)]

    def short(self) -> str:
        """One line for logs: `gs_jacobi/L32/zeros/tol0.001/cap10`."""
        if self.solver == "sequential":
            return "sequential"
        return "/".join([self.solver, *([f"L{self.segment_len}"] if self.segment_len else []), self.init,
                         f"tol{self.tol:g}", *([f"cap{self.max_iters}"] if self.max_iters else [])])


@dataclass
class Plan:
    num_blocks: int
    num_tokens: int
    blocks: list[BlockPlan]
    divergence_bound: float = 1e4
    model_hash: str | None = None
    name: str = ""
    evidence: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    @classmethod
    def uniform(cls, num_blocks: int, num_tokens: int, **block_fields) -> "Plan":
        return cls(num_blocks, num_tokens, [BlockPlan(**block_fields) for _ in range(num_blocks)]).validate()

    @classmethod
    def sequential(cls, num_blocks: int, num_tokens: int) -> "Plan":
        return cls.uniform(num_blocks, num_tokens, solver="sequential")

    @classmethod
    def from_paper_lists(cls, num_gs: list[int], max_jacobi: list[int], guess: list[int] | None,
                         num_tokens: int, tol: float = 0.0, name: str = "") -> "Plan":
        """The public GS-Jacobi code's three lists, each in *sampling* order (entry 0 drives the
        last forward block): `num_GS_list` (segments per block; 1 = plain Jacobi, 0 or T =
        sequential), `max_jacobi_list` (iteration cap per segment), `guess_list` (0 = start
        from z, 1 = from zeros; None = all z). Segments tile tokens 1..T-1 in `num_gs` pieces,
        as the authors' T // num_gs where that divides T. `tol=0` keeps the paper's fixed
        iteration budgets (stop early only at an exact fixed point)."""
        guess = [0] * len(num_gs) if guess is None else guess
        for field_name, values in (("num_GS_list", num_gs), ("max_jacobi_list", max_jacobi), ("guess_list", guess)):
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) for v in values):
                raise PlanError(f"{field_name}={values!r}: must be a list of integers")
            if len(values) != len(num_gs):
                raise PlanError(f"{field_name} has {len(values)} entries but num_GS_list has {len(num_gs)}: "
                                "give one per block")
        blocks = []
        for k, (gs, cap, g) in enumerate(zip(num_gs, max_jacobi, guess)):
            where = f"entry {k} (block {len(num_gs) - 1 - k})"
            if not 0 <= gs <= num_tokens:
                raise PlanError(f"num_GS_list {where} = {gs}: allowed 0 (sequential), 1 (Jacobi) .. {num_tokens} (T)")
            if cap < 1:
                raise PlanError(f"max_jacobi_list {where} = {cap}: must be >= 1")
            if g not in (0, 1):
                raise PlanError(f"guess_list {where} = {g}: allowed values are 0 (z) and 1 (zeros)")
            init = INIT_NAMES[g]
            if gs in (0, num_tokens):
                blocks.append(BlockPlan("sequential", init=init, tol=tol))
            elif gs == 1:
                blocks.append(BlockPlan("jacobi", max_iters=cap, tol=tol, init=init))
            else:
                blocks.append(BlockPlan("gs_jacobi", -(-(num_tokens - 1) // gs), cap, tol, init))
        return cls(len(blocks), num_tokens, blocks[::-1], name=name).validate()

    @classmethod
    def from_paper_notation(cls, spec: str, num_blocks: int, num_tokens: int, guess: list[int] | None = None,
                            tol: float = 0.0) -> "Plan":
        """A plan in the paper's [Stack-GS-J-Else] notation, e.g. `7-8-32-10`: forward block 7
        is cut into 8 segments with at most 32 Jacobi iterations each, every other block runs
        plain Jacobi capped at 10. Several tough blocks are joined by '/', with one GS and J
        value for all of them or one each: `0/7-256/8-1/13-6`. `guess` is the public code's
        guess_list (sampling order, 0 = z, 1 = zeros)."""
        text = spec.strip().strip("[]")
        parts = text.split("-")
        if len(parts) != 4:
            raise PlanError(f"hand plan {spec!r}: expected Stack-GS-J-Else, four '-'-separated fields such as "
                            "'7-8-32-10' or '0/6-8-32-20'")
        try:
            stacks, gs, caps = ([int(v) for v in p.split("/")] for p in parts[:3])
            other = int(parts[3])
        except ValueError:
            raise PlanError(f"hand plan {spec!r}: fields must be integers (several blocks joined by '/')") from None
        for field_name, values in (("GS", gs), ("J", caps)):
            if len(values) not in (1, len(stacks)):
                raise PlanError(f"hand plan {spec!r}: {field_name} has {len(values)} values for {len(stacks)} "
                                "stacked blocks; give one, or one per block")
        bad = [b for b in stacks if not 0 <= b < num_blocks]
        if bad or len(set(stacks)) != len(stacks):
            raise PlanError(f"hand plan {spec!r}: Stack names blocks {stacks}; each must be a distinct forward "
                            f"block index in 0..{num_blocks - 1}")
        num_gs, max_jacobi = [1] * num_blocks, [other] * num_blocks
        for j, b in enumerate(stacks):
            k = num_blocks - 1 - b  # the lists run in sampling order
            num_gs[k] = gs[j if len(gs) > 1 else 0]
            max_jacobi[k] = caps[j if len(caps) > 1 else 0]
        return cls.from_paper_lists(num_gs, max_jacobi, guess, num_tokens, tol, name=f"paper[{text}]")

    def validate(self) -> "Plan":
        if self.version != PLAN_VERSION:
            raise PlanError(f"plan.version={self.version!r}: this build reads version {PLAN_VERSION}")
        for name in ("num_blocks", "num_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (1 if name == "num_blocks" else 2):
                raise PlanError(f"plan.{name}={getattr(self, name)!r}: must be a positive integer")
        if len(self.blocks) != self.num_blocks:
            raise PlanError(f"plan.blocks has {len(self.blocks)} entries but plan.num_blocks={self.num_blocks}")
        if not isinstance(self.divergence_bound, (int, float)) or not self.divergence_bound > 0:
            raise PlanError(f"plan.divergence_bound={self.divergence_bound!r}: must be a number > 0")
        for i, b in enumerate(self.blocks):
            b.validate(self.num_tokens, f"plan.blocks[{i}]")
        return self

    def check_model(self, num_blocks: int, num_tokens: int, model_hash: str | None = None) -> None:
        """Raise PlanError where the plan was made for another model."""
        if (self.num_blocks, self.num_tokens) != (num_blocks, num_tokens):
            raise PlanError(f"plan is for {self.num_blocks} blocks x {self.num_tokens} tokens, "
                            f"the model has {num_blocks} blocks x {num_tokens} tokens")
        if model_hash and self.model_hash and model_hash != self.model_hash:
            raise PlanError(f"plan.model_hash={self.model_hash} but the model's hash is {model_hash}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        """Each block's solver on one line, by forward index: `0:jacobi/z/tol0.001, 1:sequential`."""
        return ", ".join(f"{i}:{b.short()}" for i, b in enumerate(self.blocks))

    def fingerprint(self) -> str:
        """Hash of what changes samples (solvers and settings), not of names or evidence."""
        core = {k: v for k, v in self.to_dict().items() if k not in ("name", "evidence")}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict):
            raise PlanError("a plan must be a JSON object")
        known = {"version", "num_blocks", "num_tokens", "blocks", "divergence_bound", "model_hash", "name", "evidence"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PlanError(f"plan has unknown field(s) {unknown}; allowed: {sorted(known)}")
        for name in ("num_blocks", "num_tokens", "blocks"):
            if name not in d:
                raise PlanError(f"plan lacks required field '{name}'")
        if not isinstance(d["blocks"], list):
            raise PlanError("plan.blocks must be a list")
        blocks = []
        block_fields = set(BlockPlan.__dataclass_fields__)
        for i, b in enumerate(d["blocks"]):
            if not isinstance(b, dict):
                raise PlanError(f"plan.blocks[{i}] must be an object")
            bad = sorted(set(b) - block_fields)
            if bad:
                raise PlanError(f"plan.blocks[{i}] has unknown field(s) {bad}; allowed: {sorted(block_fields)}")
            blocks.append(BlockPlan(**b))
        return cls(**{**d, "blocks": blocks}).validate()

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from e
        return cls.from_dict(d)

    @classmethod
    def load(cls, path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file not found: {path}")
        try:
            return cls.from_json(path.read_text())
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from e

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.validate().to_json() + "\n")
        return path
