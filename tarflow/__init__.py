"""tarflow: the TarFlow model, its exact samplers and calibration metrics, in plain PyTorch.

Knows nothing of Ray, Parquet or the CLI (those live in `workflows/`)."""
from .checkpoint import CheckpointError, load_checkpoint, model_hash, save_checkpoint
from .data import ImageDataset, load_dataset
from .demo import demo_checkpoint
from .model import Model, ModelConfig
from .noise import sample_noise
from .plan import BlockPlan, Plan, PlanError
from .solvers import Guidance, NonFiniteSampleError, SampleOutput, SampleStats, sample

__all__ = [
    "BlockPlan", "CheckpointError", "Guidance", "Model", "ModelConfig", "NonFiniteSampleError", "Plan",
    "PlanError", "SampleOutput", "SampleStats", "load_checkpoint", "model_hash", "sample", "save_checkpoint",
    "ImageDataset", "demo_checkpoint", "load_dataset", "sample_noise",
]
