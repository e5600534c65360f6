"""Click commands, one module per area. Each module exposes its commands; ALL lists them for the CLI."""
ALL = []
