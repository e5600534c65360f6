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
at once), `gs_jacobi` (segments of `segment_len` tokens in order, Jacobi inside).
`max_iters` caps Jacobi iterations per segment; null means the segment length,
where Jacobi is exact. Tokens are numbered in the block's own (permuted) order;
token 0 never changes, so segments tile tokens 1..T-1.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLAN_VERSION = 1
SOLVER_NAMES = ("sequential", "jacobi", "gs_jacobi")
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
        if self.solver == "gs_jacobi":
            if not isinstance(self.segment_len, int) or not 1 <= self.segment_len <= num_tokens - 1:
                raise PlanError(f"{where}.segment_len={self.segment_len!r}: gs_jacobi needs an integer in "
                                f"[1, {num_tokens - 1}] (T-1 for T={num_tokens} tokens)")
        elif self.segment_len is not None:
            raise PlanError(f"{where}.segment_len={self.segment_len!r}: only gs_jacobi takes a segment length")
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

    def fingerprint(self) -> str:
        """Hash of what changes samples (solvers and settings), not of names or evidence."""
        import hashlib
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
