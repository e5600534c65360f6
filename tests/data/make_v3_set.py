"""Writes `v3-set/`: a shard set as `tarflow-gs generate` left it after two crashes, made once by the code of
main at b14172f (manifest version 3) and kept byte for byte, so that tests show a set written before the
manifest became a typed model still reads and resumes (`test_shards.py::test_a_set_written_before_the_typed_manifest_reads_and_resumes`).

    PYTHONPATH=<a checkout of that commit> RAY_AUTH_MODE=disabled python tests/data/make_v3_set.py OUT

The demo model, 8 samples in shards of 2: the first run stops after two shards are recorded, the resume
folds their records into the manifest and stops after one more: the manifest lists shards 0 and 1, a record
`_shards/00002.json` lists shard 2, shard 3 is not done."""
import shutil
import sys

import ray

from tarflow import ModelRef, SamplingSpec
from workflows.config import GenerateConfig, SampleSet
from workflows.stages.generate import generate


class Crash(Exception):
    pass


def run(out: str, stop_after: int) -> None:
    done = []

    def on_shard(entry):
        done.append(entry)
        if len(done) == stop_after:
            raise Crash

    cfg = GenerateConfig(model=ModelRef("demo"), out=out, samples=SampleSet(num_samples=8, shard_size=2),
                         spec=SamplingSpec(seed=3, batch_size=2))
    try:
        generate(cfg, progress=False, on_shard=on_shard)
    except Crash:
        return
    raise SystemExit("generate finished: the crash did not happen")


if __name__ == "__main__":
    out = sys.argv[1]
    shutil.rmtree(out, ignore_errors=True)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    run(out, 2)
    run(out, 1)
