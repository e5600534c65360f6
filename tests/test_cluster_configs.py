"""The cluster configs are only run by users on real clusters: check their structure here so they do not rot."""
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _flag(commands, name):
    """Value of `--name=value` in a list of shell commands, or None."""
    for cmd in commands:
        for word in cmd.split():
            if word.startswith(f"--{name}="):
                return word.split("=", 1)[1]
    return None


def test_launcher_config_structure():
    cfg = _load("gpu-cluster.yaml")
    for key in ("cluster_name", "max_workers", "docker", "provider", "auth", "available_node_types",
                "head_node_type", "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, f"launcher config lacks {key}"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [n for n, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and cfg["head_node_type"] not in gpu_types, "GPU workers, and a head without GPU work"
    for name, t in types.items():
        assert isinstance(t["node_config"], dict) and t["node_config"].get("InstanceType")
        assert all(isinstance(v, int) and v >= 0 for v in t["resources"].values()), name
    for name in gpu_types:
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"] <= cfg["max_workers"]
    assert all(isinstance(c, str) for c in cfg["setup_commands"])


def test_launcher_uses_project_image_and_large_shm():
    docker = _load("gpu-cluster.yaml")["docker"]
    assert "tarflow-gs" in docker["image"]
    shm = [o for o in docker["run_options"] if o.startswith("--shm-size=")]
    assert shm and shm[0].endswith("g") and int(shm[0].split("=")[1][:-1]) >= 8
    assert docker["disable_shm_size_detection"] is True, "Ray's own shm detection would add a second --shm-size"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "FROM rayproject/ray:" in dockerfile and "pip install" in dockerfile


def test_launcher_token_auth_on_and_dashboard_on_loopback():
    cfg = _load("gpu-cluster.yaml")
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    head = cfg["head_start_ray_commands"]
    assert any("ray start --head" in c for c in head)
    assert _flag(head, "dashboard-host") == "127.0.0.1", "the dashboard must not listen on public interfaces"
    for cmd in head + cfg["worker_start_ray_commands"]:
        assert "0.0.0.0" not in cmd and "RAY_AUTH_MODE=disabled" not in cmd


def test_rayjob_manifest_structure():
    job = _load("rayjob-fid-set.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "jobs/fid_set.py" in spec["entrypoint"]
    config = spec["entrypoint"].split("jobs/fid_set.py")[1].split()[0].replace("/home/ray/tarflow-gs/", "")
    assert (CLUSTER.parent / config).is_file(), f"the RayJob runs {config}, which is not in the repository"
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP", "no public dashboard/job endpoint"
    assert cluster["rayVersion"].startswith("2.")
    workers = cluster["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert "tarflow-gs" in container["image"]
        for kind in ("requests", "limits"):
            gpus = container["resources"][kind]["nvidia.com/gpu"]
            assert isinstance(gpus, int) and gpus >= 1
        shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm, "GPU workers need a memory-backed /dev/shm for the object store"


@pytest.mark.parametrize("name", ["gpu-cluster.yaml", "rayjob-fid-set.yaml"])
def test_cluster_guide_covers_each_file_and_lifecycle(name):
    guide = (CLUSTER / "README.md").read_text()
    assert name in guide
    for step in ("ray up", "ray job submit", "ray dashboard", "ray down", "kubectl apply", "port-forward",
                 "kubectl delete"):
        assert step in guide
