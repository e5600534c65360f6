"""Click commands, one module per area. Each module exposes its commands; ALL lists them for the CLI."""
from .fid import ALL as _fid
from .generate import ALL as _generate
from .pipeline import ALL as _pipeline
from .planning import ALL as _planning
from .train_sample import ALL as _train_sample

ALL = [*_fid, *_generate, *_pipeline, *_planning, *_train_sample]
