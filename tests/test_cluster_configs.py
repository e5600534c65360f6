"""The cluster configs are only run by users on real clusters: check their structure here so they do not rot."""
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
PUBLISHED = ("afhq256", "imagenet64-uncond", "imagenet64", "imagenet128")  # tests/test_published_configs.py


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


def test_launcher_config_validates_against_rays_own_schema():
    import json
    import os

    import jsonschema
    import ray

    schema = json.loads(Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text())
    jsonschema.validate(_load("gpu-cluster.yaml"), schema)


def _capacity(name):
    """(head CPUs, head GPUs, [(max nodes, CPUs, GPUs) per worker type]) of a cluster file."""
    cfg = _load(name)
    if name == "gpu-cluster.yaml":
        types = cfg["available_node_types"]
        head = types[cfg["head_node_type"]]["resources"]
        workers = [(t["max_workers"], t["resources"].get("CPU", 0), t["resources"].get("GPU", 0))
                   for n, t in types.items() if n != cfg["head_node_type"]]
        return head.get("CPU", 0), head.get("GPU", 0), workers
    cluster = cfg["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["rayStartParams"]
    workers = []
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        workers.append((group["maxReplicas"], float(limits["cpu"]), limits["nvidia.com/gpu"]))
    return float(head["num-cpus"]), float(head["num-gpus"]), workers


def _rayjob_config():
    entry = _load("rayjob-fid-set.yaml")["spec"]["entrypoint"]
    return entry.split("jobs/fid_set.py")[1].split()[0].replace("/home/ray/tarflow-gs/", "")


@pytest.mark.parametrize("cluster, config", [
    ("rayjob-fid-set.yaml", "rayjob"),
    *[("gpu-cluster.yaml", f"jobs/configs/{name}.yaml") for name in PUBLISHED],
])
def test_cluster_files_cover_the_job_configs_they_ship_with(cluster, config):
    """The head schedules nothing (it runs the driver); the workers the cluster can grow to place every
    worker each stage asks for; the KubeRay job retries (a retry resumes) and grows by itself."""
    from workflows.config import RunConfig

    cfg = RunConfig.load(CLUSTER.parent / (_rayjob_config() if config == "rayjob" else config))
    head_cpus, head_gpus, workers = _capacity(cluster)
    assert head_cpus == 0 and head_gpus == 0
    for stage in ("profile", "generate", "fid"):
        res = getattr(cfg.resources, stage)
        fits = [(n, cpus, gpus) for n, cpus, gpus in workers if gpus >= res.num_gpus and cpus >= (res.num_cpus or 0)]
        assert fits, f"{stage}: no worker type gives {res.num_cpus} CPU + {res.num_gpus} GPU"
        per_node = max(min(int(cpus // (res.num_cpus or 1)), int(gpus // res.num_gpus) if res.num_gpus else 99)
                       for _, cpus, gpus in fits)
        assert sum(n for n, _, _ in fits) * per_node >= res.actors, f"{stage}: {res.actors} workers do not fit"
    if cluster == "rayjob-fid-set.yaml":
        spec = _load(cluster)["spec"]
        assert spec["backoffLimit"] >= 1 and spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True


def test_every_pod_has_a_memory_backed_shm_and_the_image_bakes_offline_fid():
    cluster = _load("rayjob-fid-set.yaml")["spec"]["rayClusterSpec"]
    for pod in [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                                 for g in cluster["workerGroupSpecs"]]:
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        shm = next(name for name, path in mounts.items() if path == "/dev/shm")
        assert volumes[shm]["emptyDir"]["medium"] == "Memory" and volumes[shm]["emptyDir"]["sizeLimit"]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "pip install --no-cache-dir torch==" in dockerfile and "download.pytorch.org/whl/cu" in dockerfile
    assert "fid-export-inception /home/ray/tarflow-gs/weights/inception-v3-compat.pth" in dockerfile
    for config in PUBLISHED:
        text = (CLUSTER.parent / "jobs" / "configs" / f"{config}.yaml").read_text()
        assert "weights: /home/ray/tarflow-gs/weights/inception-v3-compat.pth" in text
