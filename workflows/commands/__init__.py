"""Click commands, one module per area. Each module exposes its commands; ALL lists them for the CLI."""
from .generate import ALL as _generate
from .train_sample import ALL as _train_sample

ALL = [*_generate, *_train_sample]
