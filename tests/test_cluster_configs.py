"""The cluster configs are only run by users on real clusters: check them here so they do not rot: the launcher
file against Ray's own schema, the RayJobs against KubeRay's own CRD schema (vendored, a named version), the
other manifests against Kubernetes' own schemas (kubernetes-validate, a named version), and what each job
would run once the placeholders the guide lists are filled in."""
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
PUBLISHED = ("afhq256", "imagenet64-uncond", "imagenet64", "imagenet128")  # tests/test_published_configs.py
RAYJOBS = ("rayjob-fid-set.yaml", "rayjob-nightly.yaml")
CORE = ("serviceaccount.yaml", "models-pvc.yaml", "nightly-cronjob.yaml")  # Kubernetes' own kinds
KUBERAY_SCHEMA = CLUSTER / "schemas" / "kuberay-v1.7.0-rayjob.json"
KUBERNETES_VERSION = "1.33.0"
IMAGE_ROOT = "/home/ray/tarflow-gs/"  # where cluster/Dockerfile installs the repository
# Allocatable of the node types the manifests name (EKS: 8 vCPU less 90 m kube-reserved; 32 GiB less what
# the kernel keeps, 255 Mi + 11 Mi x 58 pods kube-reserved and the 100 Mi eviction threshold), and what the
# node's own daemons (CNI, kube-proxy, device plugin, CSI) may request besides a Ray pod.
ALLOCATABLE = {"m5.2xlarge": {"cpu": 7.91, "memory": 30.0}, "g5.2xlarge": {"cpu": 7.91, "memory": 30.0}}
DAEMONS = {"cpu": 0.5, "memory": 1.0}


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


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_manifest_structure(name):
    job = _load(name)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
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


@pytest.mark.parametrize("name", ["gpu-cluster.yaml", *RAYJOBS, *CORE])
def test_cluster_guide_covers_each_file_and_lifecycle(name):
    guide = (CLUSTER / "README.md").read_text()
    assert name in guide
    for step in ("ray up", "ray job submit", "ray dashboard", "ray down", "docker push", "@sha256:",
                 "kubectl apply", "kubectl create configmap", "kubectl delete rayjob", "port-forward",
                 "report.html", "--accept"):
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


def _entrypoint(job: dict) -> tuple[str, dict]:
    """(script, its parsed options) of a RayJob's entrypoint, parsed by the CLI command the script runs."""
    from workflows.cli.pipeline import nightly_command, run_command

    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "python" and words[1].startswith(IMAGE_ROOT), words[:2]
    script = words[1].removeprefix(IMAGE_ROOT)
    command = {"jobs/fid_set.py": run_command, "jobs/nightly.py": nightly_command}[script]
    return script, command.make_context(script, words[2:]).params


def _in_repo(path: str) -> Path:
    assert path.startswith(IMAGE_ROOT), f"{path} is not in the image's copy of the repository"
    return REPO / path.removeprefix(IMAGE_ROOT)


def _what_it_runs(job: dict):
    """The configs a RayJob's job runs, as the job would load them: (nightly config or None, run configs)."""
    from workflows.config import NightlyConfig, RunConfig

    script, params = _entrypoint(job)
    if script == "jobs/fid_set.py":
        cfg = RunConfig.load(_in_repo(params["config"]))
        return None, [cfg.model_copy(update={"output": params["output"]}) if params["output"] else cfg]
    nightly = NightlyConfig.load(_in_repo(params["config"]), output=params["output"])
    return nightly, [RunConfig.load(m.config) for m in nightly.models]


@pytest.mark.parametrize("cluster, config", [
    *[(name, None) for name in RAYJOBS],
    *[("gpu-cluster.yaml", f"jobs/configs/{name}.yaml") for name in PUBLISHED],
])
def test_cluster_files_cover_the_job_configs_they_ship_with(cluster, config):
    """The head schedules nothing (it runs the driver); the workers the cluster can grow to place every
    worker each stage asks for; the KubeRay job retries (a retry resumes) and grows by itself."""
    from workflows.config import RunConfig

    configs = [RunConfig.load(REPO / config)] if config else _what_it_runs(_load(cluster))[1]
    head_cpus, head_gpus, workers = _capacity(cluster)
    assert head_cpus == 0 and head_gpus == 0
    for stage, cfg in [(stage, cfg) for cfg in configs for stage in ("profile", "generate", "fid")]:
        res = getattr(cfg.resources, stage)
        fits = [(n, cpus, gpus) for n, cpus, gpus in workers if gpus >= res.num_gpus and cpus >= (res.num_cpus or 0)]
        assert fits, f"{stage}: no worker type gives {res.num_cpus} CPU + {res.num_gpus} GPU"
        per_node = max(min(int(cpus // (res.num_cpus or 1)), int(gpus // res.num_gpus) if res.num_gpus else 99)
                       for _, cpus, gpus in fits)
        assert sum(n for n, _, _ in fits) * per_node >= res.actors, f"{stage}: {res.actors} workers do not fit"
    if cluster in RAYJOBS:
        spec = _load(cluster)["spec"]
        assert spec["backoffLimit"] >= 1 and spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True


def _groups(name: str) -> list[dict]:
    """The head group and each worker group of a RayJob's cluster."""
    cluster = _load(name)["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def _quantity(value) -> float:
    """A Kubernetes quantity in CPUs or GiB (the forms the manifests use)."""
    value = str(value)
    for suffix, scale in (("Gi", 1.0), ("Mi", 1 / 1024), ("m", 1e-3)):
        if value.endswith(suffix):
            return float(value[:-len(suffix)]) * scale
    return float(value)


@pytest.mark.parametrize("name", RAYJOBS)
def test_every_pod_has_a_memory_backed_shm_above_its_object_store(name):
    """/dev/shm holds Ray's object store (the head's holds the model state the driver puts there): each pod
    sizes its store explicitly, below a memory-backed /dev/shm, below the pod's memory limit (tmpfs pages
    count against it)."""
    for group in _groups(name):
        pod = group["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        shm = volumes[next(n for n, path in mounts.items() if path == "/dev/shm")]["emptyDir"]
        assert shm["medium"] == "Memory"
        store_gib = int(group["rayStartParams"]["object-store-memory"]) / 2**30
        limit = _quantity(pod["containers"][0]["resources"]["limits"]["memory"])
        assert 2 <= store_gib < _quantity(shm["sizeLimit"]) < limit, (store_gib, shm["sizeLimit"], limit)


def test_the_image_bakes_offline_fid_and_kubectl():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "pip install --no-cache-dir torch==" in dockerfile and "download.pytorch.org/whl/cu" in dockerfile
    assert "fid-export-inception /home/ray/tarflow-gs/weights/inception-v3-compat.pth" in dockerfile
    assert re.search(r"COPY --from=registry\.k8s\.io/kubectl:v[\d.]+ /bin/kubectl /usr/local/bin/kubectl", dockerfile)
    for config in PUBLISHED:
        text = (CLUSTER.parent / "jobs" / "configs" / f"{config}.yaml").read_text()
        assert "weights: /home/ray/tarflow-gs/weights/inception-v3-compat.pth" in text


# ---- Kubernetes manifests against the API's own schemas -------------------------------------------------------

def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _strict(schema):
    """A CRD schema as the API server applies it with strict field validation (kubectl's default): a field the
    schema does not name is an error unless it keeps unknown fields; int-or-string is an integer or a string.
    (Its CEL rules, x-kubernetes-validations, guard fields the manifests leave unset: see the test below.)"""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _kuberay_errors(doc: dict) -> list[str]:
    import jsonschema

    vendored = json.loads(KUBERAY_SCHEMA.read_text())
    assert vendored["kuberay_version"] == "v1.7.0" and (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    validator = jsonschema.Draft7Validator(_strict(vendored["openAPIV3Schema"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjobs_validate_against_kuberays_own_crd_schema(name):
    [job] = _documents(name)
    assert _kuberay_errors(job) == []
    # the check bites: a misspelt field (also deep in a pod template), a wrong type, a value below its minimum
    spec = job["spec"]
    typo = json.loads(json.dumps(job))
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "x"
    for bad in ({**job, "spec": {**spec, "backofLimit": 2}}, typo, {**job, "spec": {**spec, "backoffLimit": "two"}},
                {**job, "spec": {**spec, "preRunningDeadlineSeconds": 0}}):
        assert _kuberay_errors(bad)
    # the CRD's CEL rules guard only fields these manifests do not set
    assert not {"deletionStrategy", "managedBy"} & set(spec) and not {"managedBy", "gcsFaultToleranceOptions"} & set(
        spec["rayClusterSpec"])


@pytest.mark.parametrize("name", CORE)
def test_other_manifests_validate_against_kubernetes_own_schemas(name):
    """kubernetes-validate: the API's schemas for Kubernetes 1.33, strict (unknown fields refused)."""
    import kubernetes_validate

    docs = _documents(name)
    assert docs
    for doc in docs:
        assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == "1.33"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**docs[-1], "spec": {**docs[-1].get("spec", {}), "concurency": 1}},
                                     KUBERNETES_VERSION, strict=True)


# ---- what the jobs run once the guide's placeholders are filled in ---------------------------------------------

def _placeholders() -> dict[str, str]:
    """The placeholders cluster/README.md lists under "What to fill in", each with a value a user could give."""
    guide = (CLUSTER / "README.md").read_text()
    section = guide.split("## What to fill in", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `(<[a-z-]+>)` \|", section, flags=re.M)
    assert "<bucket>" in names and "<digest>" in names
    return {n: ("0" * 64 if n == "<digest>" else f"filled-{n[1:-1]}") for n in names}


@pytest.mark.parametrize("name", [*RAYJOBS, *CORE])
def test_every_placeholder_in_a_manifest_is_one_the_guide_lists(name):
    text = (CLUSTER / name).read_text()
    body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # comments may show examples
    assert set(re.findall(r"<[a-z-]+>", body)) <= set(_placeholders()), name


@pytest.mark.parametrize("name", RAYJOBS)
def test_the_rayjobs_run_as_shipped_once_the_guide_is_followed(name):
    """Fill in the listed placeholders and parse the entrypoint with the job's own CLI: the output (and the
    nightly's history) is in the bucket and nothing the job reads or writes is a placeholder (today's shipped
    RayJob ran the baked-in imagenet128.yaml, whose output is s3://<bucket>/...)."""
    text = (CLUSTER / name).read_text()
    for placeholder, value in _placeholders().items():
        text = text.replace(placeholder, value)
    job = yaml.safe_load(text)
    nightly, configs = _what_it_runs(job)
    places = [c.output for c in configs] if nightly is None else [nightly.output, nightly.history]
    for place in places:
        assert place.startswith("s3://filled-bucket/"), place
    # the nightly gives each run config its night's folder as output: all else is read as it is
    used = json.dumps([c.model_dump(mode="json", exclude={"output"} if nightly else None) for c in configs])
    assert "<" not in used, used
    for cfg in configs:  # what the pods mount: the models volume and the image's own files
        assert cfg.model.checkpoint.startswith("/models/") and cfg.fid.reference.startswith("/models/")
        assert cfg.fid.weights.startswith(IMAGE_ROOT) and cfg.resources.generate.num_gpus >= 1
    for pod in [g["template"]["spec"] for g in _groups(name)]:
        assert pod["serviceAccountName"] == "tarflow-gs", "the bucket's credentials come with the service account"


def test_the_service_account_and_models_volume_are_what_the_pods_use():
    [account] = _documents("serviceaccount.yaml")
    assert account["metadata"]["name"] == "tarflow-gs"
    assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} <= set(account["metadata"]["annotations"])
    [claim] = _documents("models-pvc.yaml")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"], "every GPU node mounts the models at once"
    for name in RAYJOBS:
        for pod in [g["template"]["spec"] for g in _groups(name)]:
            [models] = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
            assert models["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}


@pytest.mark.parametrize("name", RAYJOBS)
def test_pods_request_less_than_their_node_types_allocatable(name):
    """Each pod names its node type, and asks for less than that type's allocatable minus its daemons'
    requests (8 CPUs on an 8-vCPU GPU node would stay Pending)."""
    for pod in [g["template"]["spec"] for g in _groups(name)]:
        node_type = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
        requests = pod["containers"][0]["resources"]["requests"]
        for resource in ("cpu", "memory"):
            assert _quantity(requests[resource]) + DAEMONS[resource] <= ALLOCATABLE[node_type][resource], (
                node_type, resource, requests[resource])


def test_every_image_is_pinned_by_digest():
    """A tag can move; a digest names one image, so every node and every retry runs the same bits."""
    images = [_load("gpu-cluster.yaml")["docker"]["image"]]
    for name in [*RAYJOBS, *CORE]:
        text = (CLUSTER / name).read_text()
        images += [m.strip() for m in re.findall(r"^\s*image:\s*(\S+)", text, flags=re.M)]
    assert len(images) >= 4
    for image in images:
        assert re.fullmatch(r"<registry>/tarflow-gs@sha256:<digest>", image), image


def test_the_nightly_runs_on_the_fid_sets_cluster():
    assert _load("rayjob-nightly.yaml")["spec"]["rayClusterSpec"] == _load("rayjob-fid-set.yaml")["spec"][
        "rayClusterSpec"]


@pytest.mark.parametrize("status, exit_code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_the_cronjob_names_each_night_and_submits_its_rayjob(tmp_path, status, exit_code):
    """The CronJob forbids overlap; its submitter (run here with a stand-in kubectl: no API server here) applies
    the nightly RayJob named after the scheduled minute, with that name as --run-id, and exits as the Ray job
    did."""
    [*_, cron] = _documents("nightly-cronjob.yaml")
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    # a night ends before the next is due: every RayJob attempt (KubeRay restarts its clock on a retry) within
    # the submitter's deadline, and that, started as late as allowed, within the day
    rayjob, job = _load("rayjob-nightly.yaml")["spec"], cron["spec"]["jobTemplate"]["spec"]
    assert cron["spec"]["schedule"].split()[2:] == ["*", "*", "*"], "daily"
    assert (rayjob["backoffLimit"] + 1) * rayjob["activeDeadlineSeconds"] < job["activeDeadlineSeconds"]
    assert job["activeDeadlineSeconds"] + cron["spec"]["startingDeadlineSeconds"] <= 24 * 3600
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    [mount] = container["volumeMounts"]
    assert env["RAYJOB"]["value"].startswith(mount["mountPath"] + "/")
    assert {v["name"]: v for v in pod["volumes"]}[mount["name"]]["configMap"]["name"] == "tarflow-gs-nightly"
    kubectl = tmp_path / "kubectl"
    kubectl.write_text('#!/bin/bash\n'
                       'case "$1" in\n'
                       '  apply) cat > "$STANDIN/applied.yaml" ;;\n'
                       '  get) case "$5" in *jobDeploymentStatus*) printf Complete ;; *) printf "$JOB_STATUS" ;; esac ;;\n'
                       'esac\n')
    kubectl.chmod(0o755)
    job_name, night = f"{cron['metadata']['name']}-29412345", "tarflow-gs-nightly-29412345"  # as the CronJob names it
    run = subprocess.run([*container["command"], *container["args"]], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "STANDIN": str(tmp_path),
                              "JOB_STATUS": status, "JOB": job_name, "RAYJOB": str(CLUSTER / "rayjob-nightly.yaml")})
    assert run.returncode == exit_code, run.stderr
    job = yaml.safe_load((tmp_path / "applied.yaml").read_text())
    # a name of its own: KubeRay names the RayJob's submitter Job after it, which must not be the CronJob's Job
    assert job["metadata"]["name"] == night != job_name and _kuberay_errors(job) == []
    assert _entrypoint(job)[1]["run_id"] == night and _entrypoint(job)[1]["require_baseline"] is True
