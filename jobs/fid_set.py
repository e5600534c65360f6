"""`ray job submit` entrypoint: an FID set (profile -> auto plan -> samples -> FID -> report) from a run config.

    ray job submit --working-dir . -- python jobs/fid_set.py jobs/configs/afhq256.yaml [--output URI]

The same as `tarflow-gs run`, from the submitted copy of the repository. Inside a Ray job
RAY_ADDRESS names the cluster, so the run joins it; run by hand without it, a private local
Ray starts. Re-submitting the same command resumes after the last finished stage."""
from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the uploaded copy of the repository: import
# that copy (the code the user submitted), not whatever version is installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflows.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["run", *sys.argv[1:]], prog_name="jobs/fid_set.py")
