"""`ray job submit` entrypoint (or cron) for the nightly speed/quality job; exits 1 on a regression.

    ray job submit --working-dir . -- python jobs/nightly.py --config jobs/configs/nightly.yaml"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# run the submitted copy of the repository (see jobs/fid_set.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflows.nightly import NightlyConfig, run_nightly, summary_text  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="nightly config (YAML), e.g. jobs/configs/nightly.yaml")
    parser.add_argument("--accept", action="store_true",
                        help="record this run as the new baseline instead of gating it (after a deliberate change)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    result = run_nightly(NightlyConfig.load(args.config), accept=args.accept)
    print(summary_text(result))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
