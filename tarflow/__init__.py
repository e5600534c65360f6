"""tarflow: the TarFlow model, its exact samplers, profiling and planning, in plain PyTorch.

Knows nothing of Ray, Parquet or the CLI (those live in `workflows/`). pydantic, where
installed, validates the JSON forms of plans, profiles and specs (`tarflow.schema`)."""
from .checkpoint import CheckpointError, ModelRef, load_checkpoint, model_hash, resolve_checkpoint, save_checkpoint
from .data import ImageDataset, load_dataset
from .demo import demo_checkpoint
from .model import Model, ModelConfig
from .noise import sample_noise
from .plan import BlockPlan, Plan, PlanError
from .sampling import NonFiniteSampleError, SampleOutput, SampleStats, sample, sample_ids, time_in_turns
from .schedule import auto_plan
from .schema import SchemaError
from .solvers import BlockSolution, BlockSolver, GSJacobi, Jacobi, JacobiTrace, Sequential, Sliding, jacobi_trace, \
    register, solve_block
from .spec import Denoise, Guidance, SamplingSpec, SpecError

__all__ = [
    "BlockPlan", "BlockSolution", "BlockSolver", "CheckpointError", "Denoise", "GSJacobi", "Guidance", "ImageDataset",
    "Jacobi", "JacobiTrace", "Model", "ModelConfig", "ModelRef", "NonFiniteSampleError", "Plan", "PlanError",
    "SampleOutput", "SampleStats", "SamplingSpec", "SchemaError", "Sequential", "Sliding", "SpecError", "auto_plan",
    "demo_checkpoint", "jacobi_trace", "load_checkpoint", "load_dataset", "model_hash", "register",
    "resolve_checkpoint", "sample", "sample_ids", "sample_noise", "save_checkpoint", "solve_block", "time_in_turns",
]
