"""`ray job submit` entrypoint: an FID set (profile -> auto plan -> samples -> FID -> report) from a run config.

    ray job submit --working-dir . -- python jobs/fid_set.py --config jobs/configs/imagenet256.yaml

Inside a Ray job RAY_ADDRESS is set, so the pipeline joins the cluster; run by hand without it,
a local Ray starts. Re-submitting the same command resumes after the last finished stage."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# `ray job submit --working-dir .` runs this file from the uploaded copy of the repository: import
# that copy (the code the user submitted), not whatever version is installed on the cluster.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflows.commands.pipeline import summary_text  # noqa: E402
from workflows.pipeline import run  # noqa: E402
from workflows.runconfig import RunConfig  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config (YAML), e.g. jobs/configs/demo.yaml")
    parser.add_argument("--output", default=None, help="override the config's output URI")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = RunConfig.load(args.config)
    if args.output:
        cfg.output = args.output
        cfg.validate()
    result = run(cfg)
    print(summary_text(result))
    print("RESULT " + json.dumps({"fid": result.fid, "report": result.report, "samples": result.samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
