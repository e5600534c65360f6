"""`ray job submit` entrypoint (or cron) for the nightly speed/quality job; exits 1 on a regression.

    ray job submit --working-dir . -- python jobs/nightly.py jobs/configs/nightly.yaml [--accept]

The same as `tarflow-gs nightly`, from the submitted copy of the repository (see jobs/fid_set.py)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflows.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["nightly", *sys.argv[1:]], prog_name="jobs/nightly.py")
