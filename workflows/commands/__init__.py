"""Click commands, one module per area. Each module exposes its commands; ALL lists them for the CLI."""
from .generate import ALL as _generate

ALL = [*_generate]
