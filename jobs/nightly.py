"""`ray job submit` entrypoint (or cron) for the nightly speed/quality job; exits 1 on a regression.

    ray job submit --working-dir . -- python jobs/nightly.py jobs/configs/nightly-gpu.yaml \
        --output s3://BUCKET/tarflow-gs/nightly [--run-id ID] [--require-baseline] [--accept]

The same as `tarflow-gs nightly`, from the submitted copy of the repository (see jobs/fid_set.py). On a
cluster the history and output must be in a bucket; a retry given the same --run-id appends no second row
(cluster/nightly-cronjob.yaml gives each night's RayJob its own)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflows.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["nightly", *sys.argv[1:]], prog_name="jobs/nightly.py")
