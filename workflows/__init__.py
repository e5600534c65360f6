"""Everything around `tarflow`: stages on Ray, storage, FID, reports, the CLI."""
# the store options (deadlines, no listing cache) go into fsspec's configuration in every process that
# runs project code, Ray workers included, so a checkpoint URI `tarflow` opens gets them too
from .storage import files as _files  # noqa: F401
