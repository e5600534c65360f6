"""The driver SIGKILLed at random points of a run: every resume completes the set, every id exactly once,
the images bitwise those of an undisturbed run."""
import os
import random
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from workflows.storage import shards as sh

NUM_SAMPLES, SHARD = 80, 8  # ten shards


def _command(ckpt, out):
    return [shutil.which("tarflow-gs"), "generate", "--checkpoint", str(ckpt), "--in-channels", "1",
            "--num-samples", str(NUM_SAMPLES), "--seed", "3", "--batch-size", "4", "--shard-size", str(SHARD),
            "--out", str(out), "--no-progress"]


def _env():
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}


@pytest.mark.slow
def test_driver_killed_at_random_points_resumes_to_the_same_set(tmp_path, tiny8x8_checkpoint_path):
    ckpt = tiny8x8_checkpoint_path
    undisturbed = tmp_path / "undisturbed"
    subprocess.run(_command(ckpt, undisturbed), env=_env(), check=True, capture_output=True, timeout=300)

    out = tmp_path / "crashed"
    rng = random.Random(0)
    kills = []
    for shards_before_kill in (0, 2, 4, 6, 8):  # from "still starting" to "nearly done"
        run = subprocess.Popen(_command(ckpt, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while len(list(out.glob("data/train-*.parquet"))) < shards_before_kill and run.poll() is None:
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        run.send_signal(signal.SIGKILL)
        run.wait()
        kills.append(len(list(out.glob("data/train-*.parquet"))))
    assert len(set(kills)) > 1, f"the kills all hit the same point: {kills}"
    final = subprocess.run(_command(ckpt, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]

    manifest = sh.verify_shards(str(out))  # checksums, rows, every id range
    assert manifest.complete and manifest.rows == NUM_SAMPLES
    ids, labels, images = sh.read_images(str(out))
    ref_ids, ref_labels, ref_images = sh.read_images(str(undisturbed))
    assert ids.tolist() == list(range(NUM_SAMPLES)) == ref_ids.tolist()
    assert np.array_equal(labels, ref_labels) and np.array_equal(images, ref_images)
    assert sorted(p.name for p in out.iterdir()) == ["_manifest.json", "data"]  # no records, lease, temporaries
    assert len(list((out / "data").iterdir())) == NUM_SAMPLES // SHARD
