"""The GPU-cluster path on a real multi-node Ray cluster on this machine: a head that schedules nothing
(0 CPUs, 0 GPUs, like a small CPU head) and two worker nodes declaring one GPU each (torch finds none
there and samples on the CPU). A job submitted with `ray job submit` runs every stage's work on the
workers, and survives a worker node killed during generation."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_tiny16x16_4blocks_model
from ray_cluster import LocalCluster

from tarflow import save_checkpoint
from workflows.storage import shards as sh

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(head_cpus=0, head_gpus=0, workers=[(2, 1), (2, 1)])
    yield c
    c.stop()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-job")
    # 16x16 images, 64 tokens: enough sampling per shard that a node can die in the middle of it
    ckpt = save_checkpoint(make_tiny16x16_4blocks_model(), root / "tiny16x16.safetensors")

    def config(name: str, plan: dict | None = None) -> Path:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "output": str(root / name), "model": {"checkpoint": str(ckpt), "in_channels": 1},
            "calibration": {"data": None, "num_images": 2}, "plan": plan or {"tol": 1e-3},
            "sampling": {"batch_size": 4, "seed": 0}, "samples": {"num_samples": 192, "shard_size": 16},
            "fid": {"extractor": "mnist5k-classifier", "reference": "digits"},
            "resources": {"profile": {"num_cpus": 1, "num_gpus": 1}, "generate": {"actors": 2, "num_cpus": 1,
                                                                                  "num_gpus": 1},
                          "fid": {"actors": 2, "num_cpus": 1, "num_gpus": 1}}}))
        return path

    return root, config


def _index(root: Path, name: str) -> dict:
    return json.loads((root / name / "run.json").read_text())


def _ids_once(samples: str) -> None:
    manifest = sh.verify_shards(samples)
    ids = np.concatenate([t.column("sample_id").to_numpy() for t in sh.iter_shards(samples, ["sample_id"])])
    assert manifest.complete and sorted(ids.tolist()) == list(range(192))


def test_every_stage_runs_on_the_workers_never_on_the_head(cluster, job):
    root, config = job
    done = cluster.submit("python", str(REPO / "jobs" / "fid_set.py"), str(config("undisturbed")))
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    index = _index(root, "undisturbed")
    assert [s["name"] for s in index["stages"]] == ["profile", "plan", "generate", "fid", "report"]
    head = cluster.head_node_id()
    for stage in index["stages"]:
        assert stage["workers"], f"{stage['name']} says nowhere it ran"
        for w in stage["workers"]:
            assert w["node_id"] != head, f"{stage['name']} ran on the head"
            assert w["gpus"] and w["device"] == "cpu"  # a GPU was asked for and given; torch has none here
    assert len({w["node_id"] for w in index["stages"][2]["workers"]}) == 2, "one generate actor per worker node"
    _ids_once(index["samples"])
    assert f"FID: {index['fid']['fid']:.4f}" in done.stdout


def test_a_worker_node_killed_during_generation_loses_nothing(cluster, job):
    root, config = job
    # the undisturbed run's plan: a computed plan follows measured timings, and another plan makes other
    # images (within its tolerance); with the same plan, a killed node must change nothing
    path = config("disturbed", {"path": _index(root, "undisturbed")["plan"]})
    run = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address",
                            cluster.address, "--", "python", str(REPO / "jobs" / "fid_set.py"), str(path)],
                           env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((root / "disturbed").glob("samples-*/data/train-0000[2-9]-*.parquet")):
        assert run.poll() is None and time.time() < deadline, "generation never got going"
        time.sleep(0.2)
    cluster.kill_raylet(1)
    shards_at_kill = len(list((root / "disturbed").glob("samples-*/data/train-*.parquet")))
    output = run.communicate(timeout=600)[0]
    assert shards_at_kill < 12, "the node died while shards were still being made"
    if run.returncode != 0:  # the job may fail with the node; submitted again, it resumes
        again = cluster.submit("python", str(REPO / "jobs" / "fid_set.py"), str(path))
        assert again.returncode == 0, output[-3000:] + again.stdout[-3000:] + again.stderr[-2000:]
    index = _index(root, "disturbed")
    assert [s["name"] for s in index["stages"]][-1] == "report"
    _ids_once(index["samples"])
    undisturbed = _index(root, "undisturbed")
    assert index["fid"]["fid"] == pytest.approx(undisturbed["fid"]["fid"], rel=1e-9)
    a = sh.read_images(index["samples"])[2]
    b = sh.read_images(undisturbed["samples"])[2]
    assert np.array_equal(a, b), "the same images as the undisturbed run"
